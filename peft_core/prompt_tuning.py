"""Prompt tuning: p trainable soft tokens in front of the input embeddings.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
arXiv:2104.08691. The frozen model reads the prompt P before the embedded input (sec. 2.1):

    H = body([P ; X]),   P: (p, d),   X = E[input_ids]: (b, n, d),   [P ; X]: (b, p + n, d)
    decoder: head(H[:, p:])   H[:, p:]: (b, n, d)        encoder: head(H)

A decoder's head sees the n real positions only: a causal LM computes vocab logits for the
real tokens (none for the virtual ones, and its labels need no padding). Virtual tokens
take positions 0..p-1, the real ones p..p+n-1, as in HF PEFT. Sequence classification keeps
HF PEFT's semantics: an encoder pools position 0, the first virtual token (BERT inside its
body, RoBERTa and DeBERTa-v2 in their heads, which see all p + n positions); a decoder pools
its last non-padding real token (HF PEFT pools the last position, the same token unless the
batch is right-padded).

Mechanism: hooks on the model's body (graph.find_body: the module that embeds the tokens
and runs the blocks; LlamaModel, GPT2Model, BertModel, OPT's decoder).
On a call that starts a sequence (no KV cache, or an empty one) the pre-hook embeds the ids,
prepends P, and extends the attention mask (p ones) and token types (p zeros); a decoder's
post-hook drops the first p hidden states. Later calls with a filled cache (generation) find the
virtual tokens in the cache: only the mask grows by p columns and given positions shift by p.

Inference shortcut (causal decoders, grad off, eval mode): the virtual tokens come first and
attend only to each other, so their keys/values at every layer depend on P and the frozen
weights alone. They are computed once (re-done when P or a body weight is written) and handed
to the body as a filled KV cache, and the body runs on the n real tokens only: the cost of
prefix tuning, not of p + n tokens. Same math; training and encoders take the path above.

Init (`init`): "random" N(0, 1) as HF PEFT; "vocab" the embedding rows of p token ids drawn
uniformly from the vocabulary; "text" the rows of the ids of an init text, repeated or cut to
p. The tokenizer never reaches `apply`: `config.tokenize_init_text(tokenizer)` turns init_text
into `init_token_ids` first. Trainable parameters: p·d.
On disk (HF PEFT): `prompt_embeddings` (p, d); a head under "base_model.<path>".
PromptTuningConfig lives in configs.py (torch-free: the web judges values with it),
re-exported here.
"""

import math
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.utils import ModelOutput

from peft_core.configs import PromptTuningConfig
from peft_core.graph import find_body
from peft_core.methods import Method

HF_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}  # configs.INITS
ENCODER = "prompt_encoder"
EMBEDDING_KEY = f"{ENCODER}.embedding"
HF_KEY = "prompt_embeddings"


# ---------------------------------------------------------------- the body's call


def body_kwargs(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A body call's arguments by name; GPT-2 and BERT pass input_ids positionally."""
    if len(args) > 1:
        raise TypeError("prompt/prefix tuning expects the body called with input_ids first only")
    kwargs = dict(kwargs)
    if "past_key_values" in kwargs:  # transformers 5's deprecated name for `cache`
        kwargs["cache"] = kwargs.pop("past_key_values")
    if args:
        kwargs["input_ids"] = args[0]
    return kwargs


def _update_given(kwargs: dict[str, Any], name: str, change: Any) -> None:
    """kwargs[name] = change(kwargs[name]) for a tensor the caller gave; absent/None stay so."""
    if kwargs.get(name) is not None:
        kwargs[name] = change(kwargs[name])


def _starts_sequence(kwargs: dict[str, Any]) -> bool:
    cache = kwargs.get("cache")
    return cache is None or cache.get_seq_length() == 0


def _prepend_columns(tensor: torch.Tensor, p: int, value: int) -> torch.Tensor:
    """(b, n) -> (b, p + n) with `value` in the p new columns."""
    if tensor.ndim != 2:
        raise ValueError(f"prompt tuning needs 2-D (batch, tokens) masks, got {tensor.ndim}-D")
    front = torch.full_like(tensor[:, :1], value).expand(-1, p)
    return torch.cat([front, tensor], dim=1)


def _prepend_positions(positions: torch.Tensor, p: int) -> torch.Tensor:
    """Real positions (…, n) -> [0..p-1, p + positions] (…, p + n)."""
    virtual = torch.arange(p, device=positions.device, dtype=positions.dtype)
    return torch.cat([virtual.expand(*positions.shape[:-1], p), positions + p], dim=-1)


def _drop_first(output: Any, p: int) -> Any:
    """The body's output without its first p positions (last and per-layer hidden states)."""
    if not isinstance(output, ModelOutput):
        return (output[0][:, p:], *output[1:])
    output.last_hidden_state = output.last_hidden_state[:, p:]
    if getattr(output, "hidden_states", None) is not None:
        output.hidden_states = tuple(h[:, p:] for h in output.hidden_states)
    return output


def _is_causal_decoder(body: nn.Module) -> bool:
    flags = [m.is_causal for m in body.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


def _batch_size(kwargs: dict[str, Any]) -> int:
    tokens = kwargs.get("input_ids")
    return (tokens if tokens is not None else kwargs["inputs_embeds"]).shape[0]


def _wants_cache(body: nn.Module, kwargs: dict[str, Any]) -> bool:
    wanted = kwargs.get("use_cache")
    return getattr(body.config, "use_cache", True) if wanted is None else bool(wanted)


def _weights_version(body: nn.Module) -> int:
    """Grows with every in-place write into a body weight (a tensor's version counter)."""
    return sum(param._version for param in body.parameters())


class PromptEncoder(nn.Module):
    """The soft prompt P (p, d); its bound methods are the body's forward hooks."""

    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        self.embedding = nn.Parameter(embedding)  # (p, d)
        self.disabled = False
        self.merged = False
        self._prepended: torch.Tensor | None = None  # the body input built, until it returns
        self._encoding = False  # the body is running on P alone (prompt_states)
        self._states: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._states_key: tuple | None = None
        self._lent: Any = None  # a cache made for a call that asked for none, until it returns
        self.keeps_virtual = False  # an encoder: its head sees (and pools) the virtual tokens

    def prepend(self, body: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if self.disabled or self._encoding:
            return None
        kwargs = body_kwargs(args, kwargs)
        p = self.embedding.shape[0]
        _update_given(kwargs, "attention_mask", lambda mask: _prepend_columns(mask, p, 1))
        if _starts_sequence(kwargs) and self._reuses_states(body):
            given = kwargs.get("cache")
            kwargs["cache"] = self._filled_cache(body, given, _batch_size(kwargs))
            if given is None and not _wants_cache(body, kwargs):
                self._lent = kwargs["cache"]  # ours to take back: the caller asked for none
        if not _starts_sequence(kwargs):  # the filled KV cache holds the virtual tokens
            _update_given(kwargs, "position_ids", lambda positions: positions + p)
            return (), kwargs
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = body.get_input_embeddings()(kwargs["input_ids"])  # (b, n, d)
        prompt = self.embedding.to(embeds.dtype).expand(embeds.shape[0], -1, -1)  # (b, p, d)
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (b, p + n, d)
        _update_given(kwargs, "position_ids", lambda positions: _prepend_positions(positions, p))
        _update_given(kwargs, "token_type_ids", lambda types: _prepend_columns(types, p, 0))
        self._prepended = kwargs["inputs_embeds"]
        return (), kwargs

    def drop_virtual(self, body: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        lent, self._lent = self._lent, None
        if lent is not None and isinstance(output, ModelOutput) and output.get("cache") is lent:
            output.cache = None  # generate() would hand it back on its next call
            return output
        if self._prepended is None or kwargs.get("inputs_embeds") is not self._prepended:
            return None
        self._prepended = None
        return None if self.keeps_virtual else _drop_first(output, self.embedding.shape[0])

    # ------------------------------------------------ the inference shortcut

    def _reuses_states(self, body: nn.Module) -> bool:
        return not torch.is_grad_enabled() and not body.training and _is_causal_decoder(body)

    def _filled_cache(self, body: nn.Module, cache: Any, batch: int) -> Any:
        """`cache` (a new one if None) holding the virtual tokens' keys/values at every layer."""
        if cache is None:
            cache = DynamicCache(config=body.config)
        target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        for layer, (keys, values) in enumerate(self._prompt_states(body)):  # (1, n_kv, p, d_h)
            target.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
        return cache

    @torch.no_grad()
    def _prompt_states(self, body: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's keys/values of the p virtual tokens run through the body alone."""
        prompt = self.embedding
        key = (prompt._version, prompt.data_ptr(), prompt.device, _weights_version(body))
        if self._states is None or self._states_key != key:
            dtype = body.get_input_embeddings().weight.dtype
            self._encoding = True
            try:
                output = body(inputs_embeds=prompt.to(dtype)[None], use_cache=True)  # (1, p, d)
            finally:
                self._encoding = False
            cache = output["cache"]
            if isinstance(cache, EncoderDecoderCache):
                cache = cache.self_attention_cache
            self._states = [(layer.keys, layer.values) for layer in cache.layers]
            self._states_key = key
        return self._states


# ---------------------------------------------------------------- init and inject


def _init_token_ids(config: PromptTuningConfig, vocab_size: int) -> torch.Tensor:
    p = config.num_virtual_tokens
    if config.init == "vocab":
        return torch.randint(0, vocab_size, (p,))
    if config.init_token_ids is None:
        raise ValueError(
            'init="text" needs token ids: build the config with '
            "config.tokenize_init_text(tokenizer) before apply"
        )
    if max(config.init_token_ids) >= vocab_size:
        raise ValueError(f"init_token_ids reach past the vocabulary of {vocab_size} tokens")
    ids = config.init_token_ids * math.ceil(p / len(config.init_token_ids))
    return torch.tensor(ids[:p])


def initial_prompt(embeddings: nn.Embedding, config: PromptTuningConfig) -> torch.Tensor:
    """P at init, (p, d): float32 (float64 beside a float64 model) on the embeddings' device."""
    weight = embeddings.weight
    dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
    if config.init == "random":
        shape = (config.num_virtual_tokens, weight.shape[1])
        return torch.randn(shape, device=weight.device, dtype=dtype)
    ids = _init_token_ids(config, weight.shape[0]).to(weight.device)
    return weight[ids].detach().to(dtype).clone()


def inject_prompt_tuning(model: nn.Module, config: PromptTuningConfig) -> list[str]:
    """Attach the prompt as `model.prompt_encoder` and hook it into the model's body."""
    if hasattr(model, ENCODER):
        raise ValueError("this model already has a soft prompt")
    encoder = PromptEncoder(initial_prompt(model.get_input_embeddings(), config))
    model.add_module(ENCODER, encoder)
    body = find_body(model)  # the body under the head (itself for a bare body)
    encoder.keeps_virtual = not _is_causal_decoder(body)
    body.register_forward_pre_hook(encoder.prepend, with_kwargs=True)
    body.register_forward_hook(encoder.drop_virtual, with_kwargs=True)
    return [ENCODER]


# ---------------------------------------------------------------- HF PEFT format


def to_hf_config(model: nn.Module, config: PromptTuningConfig) -> dict[str, Any]:
    """Prompt tuning's keys of adapter_config.json.

    HF PEFT refuses init "TEXT" without a tokenizer name: the base model's, when known;
    otherwise "RANDOM" is written (the init no longer matters once trained).
    """
    base = model.config
    tokenizer = getattr(model, "name_or_path", None) or None
    init = HF_INITS[config.init]
    if init == "TEXT" and tokenizer is None:
        init = "RANDOM"
    return {
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": model.get_input_embeddings().weight.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": base.num_attention_heads,
        "num_layers": base.num_hidden_layers,
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": config.init_text,
        "tokenizer_name_or_path": tokenizer if init == "TEXT" else None,
        "tokenizer_kwargs": None,
    }


def refuse_encoder_decoder(hf: dict[str, Any]) -> None:
    if hf.get("num_transformer_submodules") not in (None, 1):
        raise ValueError("this adapter is for an encoder-decoder model, which peft_core lacks")


def from_hf_config(hf: dict[str, Any]) -> PromptTuningConfig:
    """The saved prompt replaces any init, so a loaded config is a random-init one."""
    refuse_encoder_decoder(hf)
    return PromptTuningConfig(
        num_virtual_tokens=hf.get("num_virtual_tokens"),
        modules_to_save=hf.get("modules_to_save") or (),
    )


def disk_key(key: str) -> str:
    return HF_KEY if key == EMBEDDING_KEY else "base_model." + key


METHOD = Method(
    peft_type="PROMPT_TUNING",
    prefix="prompt_",
    config_cls=PromptTuningConfig,
    layer_types=(PromptEncoder,),
    inject=inject_prompt_tuning,
    to_hf_config=to_hf_config,
    from_hf_config=from_hf_config,
    disk_key=disk_key,
)
