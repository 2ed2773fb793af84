"""Prefix tuning beyond the shared battery: config bounds, the table's layout (GQA), the
saved projection-free prefix, generation with a KV cache, attention implementations,
gradient checkpointing and composing with another method."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import peft_core
from peft_core.bottleneck import BottleneckConfig
from peft_core.prefix_tuning import PrefixEncoder, PrefixTuningConfig, inject_prefix_tuning
from peft_core.tiny import HIDDEN, LAYERS, VOCAB, build_tiny

P, H = 4, 8
D_KV = {"llama": 32, "gpt2": 64, "bert": 64}  # Llama: 2 key/value heads of 16


def _prefixed(
    kind: str = "llama", task: str = "causal-lm", h: int | None = None
) -> torch.nn.Module:
    torch.manual_seed(0)
    config = PrefixTuningConfig(num_virtual_tokens=P, projection_dim=h)
    return peft_core.apply(build_tiny(kind, task), config).eval()


def _encoder(model: torch.nn.Module) -> PrefixEncoder:
    return model.prefix_encoder


def _logits(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_virtual_tokens": 0},
        {"num_virtual_tokens": 1025},
        {"num_virtual_tokens": 4.0},
        {"projection_dim": 0},
        {"projection_dim": True},
        {"projection_dim": 65_537},
        {"modules_to_save": (3,)},
    ],
)
def test_config_refuses_bad_values(kwargs):
    with pytest.raises(ValueError):
        PrefixTuningConfig(**kwargs)


@pytest.mark.parametrize("h", [None, H])
def test_layer_prefixes_are_kv_heads_by_prefix_by_head_dim(h):
    encoder = _encoder(_prefixed("llama", h=h))
    assert encoder.table().shape == (P, LAYERS * 2 * D_KV["llama"])
    keys, values = encoder.layer_prefix(1)
    assert keys.shape == values.shape == (2, P, 16)  # grouped-query: 2 kv heads, not 4
    row = encoder.table()[:, 2 * D_KV["llama"] : 3 * D_KV["llama"]]  # layer 1's keys
    assert_close(keys, row.reshape(P, 2, 16).transpose(0, 1))


def test_an_attention_without_a_kv_cache_is_refused():
    model = build_tiny("deberta-v2", "seq-cls")
    with pytest.raises(ValueError, match=r"attention of deberta\.encoder\.layer\.0 never calls"):
        peft_core.apply(model, PrefixTuningConfig())


@pytest.mark.parametrize(("kind", "task"), [("llama", "causal-lm"), ("gpt2", "causal-lm")])
def test_causal_lm_computes_logits_for_the_real_tokens_only(kind, task, input_ids):
    model = _prefixed(kind, task)
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits.shape == (*input_ids.shape, VOCAB)
    assert torch.isfinite(out.loss)


def test_projection_is_folded_into_the_saved_table(input_ids, tmp_path):
    model = _prefixed("gpt2", h=H)
    peft_core.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors.keys() == {"prompt_embeddings"}
    assert_close(tensors["prompt_embeddings"], _encoder(model).table().detach())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is False
    loaded = peft_core.load_adapter(build_tiny("gpt2"), tmp_path).eval()
    assert _encoder(loaded).transform is None
    assert peft_core.trainable_parameters(loaded) == P * LAYERS * 2 * D_KV["gpt2"]
    assert_close(_logits(loaded, input_ids), _logits(model, input_ids), atol=1e-6, rtol=0)


def test_saved_config_describes_grouped_query_attention(tmp_path):
    peft_core.save_adapter(_prefixed("llama", "seq-cls"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["token_dim"], config["num_attention_heads"]) == (D_KV["llama"], 2)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors.keys() == {"prompt_embeddings", "base_model.score.weight"}


def _left_padded(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids = input_ids.clone()
    ids[1, :3] = 0
    return ids, (ids != 0).long()


@pytest.mark.parametrize(("kind", "h"), [("llama", None), ("gpt2", None), ("llama", H)])
def test_generate_with_a_cache_equals_generate_without(kind, h, input_ids):
    model = _prefixed(kind, h=h)
    ids, mask = _left_padded(input_ids)
    kwargs = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(input_ids=ids, use_cache=True, **kwargs)
    recomputed = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cached_steps_reproduce_the_full_forward(kind, input_ids):
    model = _prefixed(kind)
    with torch.no_grad():
        full = model(input_ids=input_ids).logits
        first = model(input_ids=input_ids[:, :5], use_cache=True)
        assert first.cache.get_seq_length() == 5  # the real cache holds the real tokens only
        rest = model(input_ids=input_ids[:, 5:], cache=first.cache)
    assert_close(torch.cat([first.logits, rest.logits], dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kind", "task"), [("llama", "causal-lm"), ("gpt2", "causal-lm")])
def test_eager_and_sdpa_attention_agree(kind, task, input_ids):
    ids, mask = _left_padded(input_ids)
    results = []
    for implementation in ("sdpa", "eager"):
        model = _prefixed(kind, task)
        model.set_attn_implementation(implementation)
        results.append((_logits(model, input_ids), _logits(model, ids, attention_mask=mask)))
    assert_close(results[1], results[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("h", [None, H])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant, h, input_ids):
    grads = []
    for checkpointing in (False, True):
        model = _prefixed(h=h).train()
        if checkpointing:
            kwargs = {"use_reentrant": reentrant}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(g.abs().sum() > 0 for g in grads[0])
    assert_close(grads[1], grads[0])


def test_composes_with_a_parallel_adapter(input_ids):
    torch.manual_seed(0)
    adapter = BottleneckConfig(placement="parallel", bottleneck_dim=8)
    model = peft_core.apply(build_tiny("llama"), adapter)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_" in name:
                param.normal_(0, 0.1)
    adapter_only = _logits(model, input_ids)
    paths = inject_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=P))
    assert paths == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    both = _logits(model, input_ids)
    assert not torch.allclose(both, adapter_only, atol=1e-4)
    with peft_core.disabled(model):  # the adapter's own switches
        _encoder(model).disabled = True
        assert_close(_logits(model, input_ids), _logits(build_tiny("llama"), input_ids))
    _encoder(model).disabled = False
    assert_close(_logits(model, input_ids), both)
    with pytest.raises(ValueError, match="already has a prefix"):
        inject_prefix_tuning(model, PrefixTuningConfig())


def test_hidden_size_of_the_projection_input_is_the_model_width():
    encoder = _encoder(_prefixed("bert", "seq-cls", h=H))
    assert encoder.embedding.shape == (P, HIDDEN)
    assert encoder.transform[2].out_features == LAYERS * 2 * D_KV["bert"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_init_from_real_tokens_stays_near_the_base_model(kind, input_ids):
    """The model's own keys/values as P disturb it far less than HF PEFT's N(0, 1) init."""
    base = build_tiny(kind, "causal-lm")
    with torch.no_grad():
        reference = base(input_ids=input_ids).logits
    real = peft_core.apply(build_tiny(kind, "causal-lm"), PrefixTuningConfig(num_virtual_tokens=8))
    random = peft_core.apply(
        build_tiny(kind, "causal-lm"), PrefixTuningConfig(num_virtual_tokens=8)
    )
    with torch.no_grad():
        random.prefix_encoder.embedding.normal_()
        real_gap = (real(input_ids=input_ids).logits - reference).abs().mean()
        random_gap = (random(input_ids=input_ids).logits - reference).abs().mean()
    assert real_gap < random_gap
