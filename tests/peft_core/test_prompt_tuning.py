"""Prompt tuning beyond the shared battery: config bounds, init modes, real-token logits,
generation with a KV cache, gradient checkpointing and the saved layout."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import peft_core
from peft_core.prompt_tuning import PromptEncoder, PromptTuningConfig
from peft_core.tiny import HIDDEN, VOCAB, build_tiny

P = 4


def _prompted(kind: str = "llama", task: str = "causal-lm", **config) -> torch.nn.Module:
    torch.manual_seed(0)
    config = PromptTuningConfig(num_virtual_tokens=P, **config)
    return peft_core.apply(build_tiny(kind, task), config).eval()


def _encoder(model: torch.nn.Module) -> PromptEncoder:
    return model.prompt_encoder


class _Tokenizer:
    """Stands in for a HF tokenizer: `tokenizer(text)["input_ids"]`."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [1] + [10 + len(word) for word in text.split()]}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_virtual_tokens": 0},
        {"num_virtual_tokens": 1025},
        {"num_virtual_tokens": True},
        {"num_virtual_tokens": 2.0},
        {"init": "zeros"},
        {"init": "text"},
        {"init": "random", "init_text": "hello"},
        {"init": "vocab", "init_token_ids": (1, 2)},
        {"init": "text", "init_text": ""},
        {"init": "text", "init_token_ids": ()},
        {"init": "text", "init_token_ids": (3, -1)},
        {"modules_to_save": ("",)},
    ],
)
def test_config_refuses_bad_values(kwargs):
    with pytest.raises(ValueError):
        PromptTuningConfig(**kwargs)


def test_config_normalises_names_and_tokenizes_the_init_text():
    config = PromptTuningConfig(modules_to_save="score", init="text", init_text="a bb ccc")
    assert config.modules_to_save == ("score",)
    assert config.tokenize_init_text(_Tokenizer()).init_token_ids == (1, 11, 12, 13)
    with pytest.raises(ValueError, match="init_text"):
        PromptTuningConfig().tokenize_init_text(_Tokenizer())


def test_random_init_is_standard_normal_like_hf_peft():
    torch.manual_seed(3)
    expected = torch.randn(P, HIDDEN)
    torch.manual_seed(3)
    model = peft_core.apply(build_tiny("llama"), PromptTuningConfig(num_virtual_tokens=P))
    assert_close(_encoder(model).embedding.detach(), expected)
    assert _encoder(model).embedding.dtype == torch.float32


def test_vocab_init_takes_rows_of_the_embedding_matrix():
    model = _prompted(init="vocab")
    rows = model.get_input_embeddings().weight
    for token in _encoder(model).embedding.detach():
        assert (rows == token).all(dim=1).any()


def test_text_init_repeats_the_text_tokens_to_fill_the_prompt():
    config = PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="x yy")
    model = peft_core.apply(build_tiny("gpt2"), config.tokenize_init_text(_Tokenizer()))
    rows = model.get_input_embeddings().weight
    assert_close(_encoder(model).embedding.detach(), rows[[1, 11, 12, 1, 11]])


def test_text_init_needs_token_ids_at_apply_time():
    config = PromptTuningConfig(init="text", init_text="hello world")
    with pytest.raises(ValueError, match="tokenize_init_text"):
        peft_core.apply(build_tiny("llama"), config)
    with pytest.raises(ValueError, match="vocabulary"):
        peft_core.apply(
            build_tiny("llama"), PromptTuningConfig(init="text", init_token_ids=(VOCAB,))
        )


@pytest.mark.parametrize(("kind", "task"), [("llama", "causal-lm"), ("gpt2", "causal-lm")])
def test_causal_lm_computes_logits_for_the_real_tokens_only(kind, task, input_ids):
    model = _prompted(kind, task)
    head_inputs = []
    model.lm_head.register_forward_hook(lambda m, args, out: head_inputs.append(args[0].shape))
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits.shape == (*input_ids.shape, VOCAB)
    assert head_inputs == [(*input_ids.shape, HIDDEN)]
    assert torch.isfinite(out.loss)


def test_hidden_states_cover_the_real_tokens_only(input_ids):
    out = _prompted()(input_ids=input_ids, output_hidden_states=True)
    assert {h.shape[1] for h in out.hidden_states} == {input_ids.shape[1]}


@pytest.mark.parametrize(
    ("kind", "task"), [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("llama", "seq-cls")]
)
def test_inference_reuses_the_virtual_tokens_states_with_the_same_logits(kind, task, input_ids):
    model = _prompted(kind, task)
    ids, mask = _left_padded(input_ids)
    body_lengths = []
    model.base_model.register_forward_hook(
        lambda m, args, kwargs, out: body_lengths.append(out.last_hidden_state.shape[1]),
        with_kwargs=True,
    )
    through_the_body = model(input_ids=ids, attention_mask=mask).logits  # grad on: training
    with torch.no_grad():
        reused = model(input_ids=ids, attention_mask=mask).logits
        assert model(input_ids=ids, attention_mask=mask, use_cache=False).cache is None
    assert_close(reused, through_the_body, atol=1e-5, rtol=0)
    # P + n tokens while training; P alone once, then the n real tokens only
    assert body_lengths[0] == body_lengths[2] == ids.shape[1] and body_lengths[1] == P


def test_reused_states_follow_writes_to_the_prompt_and_the_base(input_ids):
    model = _prompted()
    with torch.no_grad():
        model(input_ids=input_ids)  # computes the virtual tokens' states
        _encoder(model).embedding.mul_(2.0)  # an optimizer step, a loaded adapter
        after_prompt = model(input_ids=input_ids).logits
        model.model.layers[0].self_attn.k_proj.weight.mul_(0.5)
        after_base = model(input_ids=input_ids).logits
    assert_close(after_base, model(input_ids=input_ids).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(after_prompt, after_base, atol=1e-4)


def test_an_encoder_runs_the_virtual_tokens_through_the_body(input_ids):
    model = _prompted("bert", "seq-cls")
    with torch.no_grad():
        model(input_ids=input_ids)
    assert _encoder(model)._states is None  # bidirectional: the prompt sees the input


def test_decoder_classifier_pools_the_last_real_token_under_right_padding(input_ids):
    model = _prompted("llama", "seq-cls")
    padded = torch.cat([input_ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    mask = (padded != 0).long()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        assert_close(model(input_ids=padded, attention_mask=mask).logits, expected)


def _left_padded(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids = input_ids.clone()
    ids[1, :3] = 0
    return ids, (ids != 0).long()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_a_cache_equals_generate_without(kind, input_ids):
    model = _prompted(kind)
    ids, mask = _left_padded(input_ids)
    kwargs = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(input_ids=ids, use_cache=True, **kwargs)
    recomputed = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)


def test_cached_steps_reproduce_the_full_forward(input_ids):
    model = _prompted()
    with torch.no_grad():
        full = model(input_ids=input_ids).logits
        first = model(input_ids=input_ids[:, :5], use_cache=True)
        assert first.cache.get_seq_length() == P + 5  # the virtual tokens sit in the cache
        rest = model(input_ids=input_ids[:, 5:], cache=first.cache)
    assert_close(torch.cat([first.logits, rest.logits], dim=1), full, atol=1e-5, rtol=0)


def test_disabled_generation_is_the_base_models(input_ids):
    model = _prompted()
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    base = build_tiny("llama").generate(input_ids=input_ids, **kwargs)
    with peft_core.disabled(model):
        assert torch.equal(model.generate(input_ids=input_ids, **kwargs), base)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradient(reentrant, input_ids):
    grads = []
    for checkpointing in (False, True):
        model = _prompted().train()
        if checkpointing:
            kwargs = {"use_reentrant": reentrant}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        grads.append(_encoder(model).embedding.grad)
    assert grads[0].abs().sum() > 0
    assert_close(grads[1], grads[0])


def test_a_deep_copy_carries_its_own_prompt(input_ids):
    model = _prompted()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.prompt_encoder.embedding.mul_(2)
        assert not torch.allclose(
            twin(input_ids=input_ids).logits, model(input_ids=input_ids).logits
        )
        assert_close(
            copy.deepcopy(model)(input_ids=input_ids).logits, model(input_ids=input_ids).logits
        )


def test_saved_layout_is_hf_peft_prompt_learning(tmp_path):
    model = _prompted("llama", "seq-cls")
    peft_core.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "prompt_embeddings": (P, HIDDEN),
        "base_model.score.weight": (2, HIDDEN),
    }
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING"
    assert config["num_virtual_tokens"] == P and config["token_dim"] == HIDDEN
    assert config["prompt_tuning_init"] == "RANDOM"


def test_text_init_is_recorded_when_a_tokenizer_name_is_known(tmp_path):
    config = PromptTuningConfig(num_virtual_tokens=P, init="text", init_token_ids=(5, 6))
    model = peft_core.apply(build_tiny("llama"), config)
    peft_core.save_adapter(model, tmp_path / "anonymous")
    model.name_or_path = "org/tiny"
    peft_core.save_adapter(model, tmp_path / "named")
    saved = [
        json.loads((tmp_path / d / "adapter_config.json").read_text())
        for d in ("anonymous", "named")
    ]
    assert saved[0]["prompt_tuning_init"] == "RANDOM"  # HF PEFT refuses TEXT without a tokenizer
    assert (saved[1]["prompt_tuning_init"], saved[1]["tokenizer_name_or_path"]) == (
        "TEXT",
        "org/tiny",
    )
