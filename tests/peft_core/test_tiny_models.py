"""The tiny random models: seeded, independent of the global RNG, the documented sizes."""

import pytest
import torch

from peft_core.tiny import build_tiny, tiny_llama_config


def test_same_weights_whatever_the_global_rng_and_global_rng_untouched():
    torch.manual_seed(123)
    first = build_tiny("llama")
    after_first = torch.rand(1)
    torch.manual_seed(123)
    torch.rand(7)  # disturb the global RNG differently this time
    second = build_tiny("llama")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    torch.manual_seed(123)
    build_tiny("gpt2")
    assert torch.equal(torch.rand(1), after_first)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_models_are_float32_eval_and_sized_as_documented(kind):
    model = build_tiny(kind, "seq-cls", num_labels=3, vocab_size=300)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.get_input_embeddings().weight.shape == (300, 64)
    assert model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3)


def test_llama_uses_grouped_query_attention():
    config = tiny_llama_config()
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    k_proj = build_tiny("llama").model.layers[0].self_attn.k_proj
    assert k_proj.weight.shape == (32, 64)


@pytest.mark.parametrize(
    "kind,task", [("bert", "causal-lm"), ("t5", "causal-lm"), ("llama", "translation")]
)
def test_unknown_kind_or_task_is_refused(kind, task):
    with pytest.raises(ValueError):
        build_tiny(kind, task)
