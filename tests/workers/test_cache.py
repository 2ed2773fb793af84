"""The worker's base-model cache: bounded by memory, LRU, and copies that share the frozen
weights without ever letting a run write into them."""

import pytest
import torch

import peft_core
from peft_core.profile import inference_latency, merged_privately
from peft_core.tiny import build_tiny
from workers import cache

TINY_LLAMA = ("catalogue", "tiny-llama", "", "")  # a bundled model's weights in cache keys


@pytest.fixture(autouse=True)
def _empty_cache(monkeypatch):
    """A fake loader (tiny models, counted) and an empty cache around each test."""
    loads = []

    def load_weights(weights, task, *, num_labels, dtype):
        key = weights["location"]
        loads.append((key, task, num_labels))
        torch.manual_seed(0)
        kind = "bert" if key == "tiny-bert" else "llama"
        return build_tiny(kind, task, num_labels).to(dtype or torch.float32), object()

    monkeypatch.setattr(cache, "load_weights", load_weights)
    cache.clear()
    yield loads
    cache.clear()


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _tied_llama() -> torch.nn.Module:
    """Tiny Llama with SmolLM2's tied input embeddings and LM head."""
    model = build_tiny("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def test_a_copy_shares_the_weights_in_new_frozen_parameters():
    base = _tied_llama()
    copied = cache.shared_copy(base)
    pairs = list(zip(base.parameters(), copied.parameters(), strict=True))
    assert all(a is not b and a.data_ptr() == b.data_ptr() for a, b in pairs)
    assert not any(p.requires_grad for p in copied.parameters())
    assert copied.lm_head.weight is copied.model.embed_tokens.weight  # still tied
    assert copied.model.layers[0] is not base.model.layers[0]


def test_a_copy_can_be_adapted_trained_and_moved_without_touching_the_base():
    base = build_tiny("llama")
    before = _snapshot(base)
    model = peft_core.apply(cache.shared_copy(base), peft_core.LoraConfig(r=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.tensor([[5, 6, 7, 8]])
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.double()
    _assert_unchanged(base, before)
    assert base.lm_head.weight.dtype == torch.float32
    assert not hasattr(base, peft_core.model.CONFIG_ATTR)


@pytest.mark.parametrize(
    "config", [peft_core.LoraConfig(r=4), peft_core.DoraConfig(r=4), peft_core.IA3Config()]
)
def test_profiling_a_merged_adapter_leaves_the_shared_weights_bit_for_bit(config):
    base = build_tiny("llama")
    before = _snapshot(base)
    model = peft_core.apply(cache.shared_copy(base), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1)  # a trained adapter: merging it changes the weights
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4)}
    with torch.no_grad():
        adapted = model(**batch).logits
        with merged_privately(model):
            merged = model(**batch).logits
        after = model(**batch).logits
    assert torch.allclose(merged, adapted, atol=1e-5)
    assert torch.equal(after, adapted)
    latency = inference_latency(model, batch, repeats=2)
    assert latency["merged_ms"] > 0
    _assert_unchanged(base, before)


def test_the_cache_loads_once_and_hands_out_fresh_copies(_empty_cache):
    first, _ = cache.base_model_copy("tiny-llama", "causal-lm", 2)
    peft_core.apply(first, peft_core.LoraConfig(r=4))
    second, _ = cache.base_model_copy("tiny-llama", "causal-lm", 2)
    assert _empty_cache == [("tiny-llama", "causal-lm", 2)]
    assert not hasattr(second, peft_core.model.CONFIG_ATTR)  # untouched by the first run


def test_the_least_recently_used_model_goes_when_memory_runs_out(settings, _empty_cache):
    one_model = cache.model_bytes(build_tiny("llama"))
    settings.MODEL_CACHE_MB = 2 * one_model / 2**20 + 0.01  # room for two tiny models
    cache.base_model_copy("tiny-llama", "causal-lm", 2)
    cache.base_model_copy("tiny-llama", "seq-cls", 2)
    cache.base_model_copy("tiny-llama", "causal-lm", 2)  # now the most recently used
    cache.base_model_copy("tiny-llama", "seq-cls", 3)
    assert cache.cached_keys() == [
        (TINY_LLAMA, "causal-lm", 2, "cpu", "float32"),
        (TINY_LLAMA, "seq-cls", 3, "cpu", "float32"),
    ]
    assert len(_empty_cache) == 3


def test_a_model_over_the_limit_is_still_kept_while_it_is_the_newest(settings):
    settings.MODEL_CACHE_MB = 0
    cache.base_model_copy("tiny-llama", "causal-lm", 2)
    cache.base_model_copy("tiny-llama", "seq-cls", 2)
    assert cache.cached_keys() == [(TINY_LLAMA, "seq-cls", 2, "cpu", "float32")]


def test_room_is_made_before_a_model_loads_not_after(settings, monkeypatch):
    """With room for one model, the cached one is gone before the next one loads: the two
    are never in memory together (a 7 B model beside another does not fit a worker)."""
    held_during_loads = []
    real_load = cache.load_weights

    def load_weights(weights, task, **kwargs):
        held_during_loads.append(list(cache._models))  # the lock is held: read directly
        return real_load(weights, task, **kwargs)

    monkeypatch.setattr(cache, "load_weights", load_weights)
    settings.MODEL_CACHE_MB = 1.5 * cache.model_bytes(build_tiny("llama")) / 2**20
    cache.base_model_copy("tiny-llama", "causal-lm", 2)
    cache.base_model_copy("tiny-llama", "seq-cls", 2)
    assert held_during_loads == [[], []]


def test_a_first_load_of_unknown_size_makes_room_for_the_whole_limit(settings, monkeypatch):
    settings.MODEL_CACHE_MB = 100
    cache.base_model_copy("tiny-llama", "causal-lm", 2)
    monkeypatch.setattr(cache, "weight_file_bytes", lambda key: None)
    cache.base_model_copy("tiny-bert", "seq-cls", 2)  # never loaded here, no files to size
    assert [key[0][1] for key in cache.cached_keys()] == ["tiny-bert"]


def test_the_dtype_is_part_of_the_key(_empty_cache):
    full, _ = cache.base_model_copy("tiny-llama", "causal-lm", 2)
    half, _ = cache.base_model_copy("tiny-llama", "causal-lm", 2, dtype=torch.bfloat16)
    assert next(full.parameters()).dtype == torch.float32
    assert next(half.parameters()).dtype == torch.bfloat16
    assert [key[-1] for key in cache.cached_keys()] == ["float32", "bfloat16"]
    assert len(_empty_cache) == 2


def test_the_limit_counts_tied_weights_once():
    model = _tied_llama()
    expected = sum(p.numel() * p.element_size() for p in model.parameters())  # unique params
    expected += sum(b.numel() * b.element_size() for b in model.buffers())
    assert cache.model_bytes(model) == expected


def test_a_cached_model_written_into_is_loaded_again(_empty_cache):
    model, _ = cache.base_model_copy("tiny-llama", "causal-lm", 2)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # what an in-place merge of a shared weight would do
    fresh, _ = cache.base_model_copy("tiny-llama", "causal-lm", 2)
    assert len(_empty_cache) == 2
    key = (TINY_LLAMA, "causal-lm", 2, "cpu", "float32")
    assert cache._models[key].untouched()
    assert not torch.equal(fresh.lm_head.weight, model.lm_head.weight)
