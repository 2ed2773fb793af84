"""structure.py finds every family's places from its module graph and one traced forward,
finds them in a model no table names, and refuses ambiguous structures naming the candidates."""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import peft_core
from peft_core.bottleneck import BottleneckConfig, ParallelAtOutput
from peft_core.configs import IA3Config, LoraConfig, PrefixTuningConfig
from peft_core.graph import classifier_head, find_body
from peft_core.structure import find_places
from peft_core.targets import ia3_default_paths, lora_default_paths, resolve_targets
from peft_core.tiny import tiny_config
from tests.peft_core.families import FAMILY_CASES, fresh, toy
from tests.peft_core.test_lora import logits, perturb

LLAMA = ("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LLAMA += ("self_attn.o_proj", "mlp.down_proj", "mlp", False)
ENCODER = ("attention.self", "attention.self.query", "attention.self.key")
ENCODER += ("attention.self.value", "attention.output.dense", "output.dense", "output", True)


def fused(attention: str, qkv: str, out: str, ffn_out: str) -> tuple:
    return (attention, qkv, qkv, qkv, out, ffn_out, "mlp", False)


# kind: (attention, query, key, value, attention output, FFN output, FFN module, FFN(h, y)),
# and the cached keys' (n_kv, d_h) with the keyword the attention takes its cache by.
PLACES = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma2": LLAMA,
    "gemma3_text": LLAMA,
    "phi3": fused("self_attn", "self_attn.qkv_proj", "self_attn.o_proj", "mlp.down_proj"),
    "gpt_neox": fused(
        "attention", "attention.query_key_value", "attention.dense", "mlp.dense_4h_to_h"
    ),
    "gpt2": fused("attn", "attn.c_attn", "attn.c_proj", "mlp.c_proj"),
    "falcon": fused(
        "self_attention",
        "self_attention.query_key_value",
        "self_attention.dense",
        "mlp.dense_4h_to_h",
    ),
    "opt": ("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    + ("self_attn.out_proj", "fc2", None, False),  # fc1, fc2 in the block: no FFN module
    "bert": ENCODER,
    "roberta": ENCODER,
    "deberta-v2": ("attention.self", "attention.self.query_proj", "attention.self.key_proj")
    + ("attention.self.value_proj", "attention.output.dense", "output.dense", "output", True),
    "starcoder2": LLAMA[:5] + ("mlp.c_proj", "mlp", False),
}
PLACES["falcon-new"] = PLACES["falcon"]
KV = {kind: (2, 16, "cache") for kind in ("llama", "mistral", "qwen2", "qwen3", "phi3")}
KV |= {"gemma2": (2, 32, "cache"), "gemma3_text": (2, 32, "cache"), "starcoder2": (2, 16, "cache")}
KV |= {"gpt_neox": (4, 16, "layer_past"), "gpt2": (4, 16, "cache"), "opt": (4, 16, "cache")}
KV |= {"falcon": (1, 16, "layer_past")}  # multi-query: one key/value head
KV |= {"falcon-new": (4, 16, "layer_past")}  # keys cached broadcast to every head
KV |= {"bert": (4, 16, "cache"), "roberta": (4, 16, "cache"), "deberta-v2": None}


@pytest.mark.parametrize(("kind", "task"), FAMILY_CASES)
def test_every_family_is_placed_from_its_structure(kind, task):
    places = find_places(fresh(kind, task))
    found = (places.attention, *places.query, *places.key, *places.value)
    found += (places.attention_output, places.ffn_output, places.ffn, places.ffn_takes_residual)
    assert found == PLACES[kind]
    kv = places.kv and (places.kv.kv_heads, places.kv.head_dim, places.kv.cache_arg)
    assert kv == KV[kind]
    assert places.layers == 2 and places.hidden == 64


def test_the_old_name_tables_are_what_the_structure_finds():
    """targets.py's former tables (llama, gpt2, bert), now derived."""
    old = {
        ("llama", "causal-lm"): ("layers", "self_attn", "self_attn.o_proj", "mlp.down_proj", "mlp"),
        ("gpt2", "causal-lm"): ("h", "attn", "attn.c_proj", "mlp.c_proj", "mlp"),
        ("bert", "seq-cls"): ("layer", "attention.self", "attention.output.dense", "output.dense")
        + ("output",),
    }
    for (kind, task), (blocks, *places) in old.items():
        found = find_places(fresh(kind, task))
        assert found.blocks.rsplit(".", 1)[-1] == blocks
        assert [found.attention, found.attention_output, found.ffn_output, found.ffn] == places


@pytest.mark.parametrize(
    ("kind", "task", "head"),
    [
        ("llama", "seq-cls", "score"),
        ("gpt2", "seq-cls", "score"),
        ("bert", "seq-cls", "classifier"),
        ("roberta", "seq-cls", "classifier"),  # a module: dense, then out_proj to the labels
        ("deberta-v2", "seq-cls", "classifier"),  # not its pooler, which outputs d
        ("llama", "causal-lm", None),
    ],
)
def test_the_classification_head_is_the_top_module_giving_num_labels(kind, task, head):
    assert classifier_head(fresh(kind, task)) == head


def test_all_linear_leaves_out_what_is_inside_a_classification_head():
    paths = resolve_targets(fresh("roberta", "seq-cls"), "all-linear")
    assert len(paths) == 2 * 6 and not any(p.startswith("classifier") for p in paths)


def test_the_body_is_what_the_heads_call():
    """OPT's heads call model.decoder directly, past OPTModel: prompt and prefix hook there."""
    opt, llama = fresh("opt", "causal-lm"), fresh("llama", "causal-lm")
    assert find_body(opt) is opt.model.decoder
    assert find_body(llama) is llama.model


def test_prefix_tuning_refuses_alibi():
    """Falcon's ALiBi variant builds its attention biases for the real keys only."""
    config = tiny_config("falcon")
    config.alibi = True
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="ALiBi"):
        peft_core.apply(model, PrefixTuningConfig(num_virtual_tokens=4))


def test_opt_parallel_adapter_adds_the_branch_of_the_ffn_input(input_ids):
    model = peft_core.apply(fresh("opt", "causal-lm"), BottleneckConfig(placement="parallel"))
    perturb(model)
    block = model.get_submodule("model.decoder.layers.0")
    assert isinstance(block.fc2, ParallelAtOutput)
    seen = {}
    block.fc1.register_forward_hook(lambda m, args, out: seen.update(y=args[0]))
    block.fc2.register_forward_hook(lambda m, args, out: seen.update(h=args[0], out=out))
    logits(model, input_ids)
    with torch.no_grad():
        expected = block.fc2.base_layer(seen["h"]) + block.fc2.branch(seen["y"])
    assert_close(seen["out"], expected)


# ---------------------------------------------------------------- a model no table names


def test_a_model_of_our_own_is_placed_from_its_structure():
    model = toy()
    places = find_places(model)
    assert (places.blocks, places.attention, places.attention_output) == (
        "trunk",
        "mix",
        "mix.merge",
    )
    assert (places.query, places.key, places.value) == (
        ("mix.to_queries",),
        ("mix.to_keys",),
        ("mix.to_values",),
    )
    assert (places.ffn_inputs, places.ffn_output, places.ffn) == (("ff.widen",), "ff.narrow", "ff")
    assert (places.kv.kv_heads, places.kv.head_dim, places.kv.cache_arg) == (2, 16, "memory")
    assert lora_default_paths(model) == [
        f"trunk.{i}.mix.to_{role}" for i in range(2) for role in ("queries", "values")
    ]
    targets, feedforward = ia3_default_paths(model)
    assert feedforward == ["trunk.0.ff.narrow", "trunk.1.ff.narrow"]
    assert set(targets) - set(feedforward) == {
        f"trunk.{i}.mix.to_{role}" for i in range(2) for role in ("keys", "values")
    }


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, dropout=0.0),
        IA3Config(),
        BottleneckConfig(placement="houlsby"),
        BottleneckConfig(placement="parallel"),
        PrefixTuningConfig(num_virtual_tokens=4),
    ],
    ids=["lora", "ia3", "houlsby", "parallel", "prefix"],
)
def test_the_methods_run_on_a_model_of_our_own(config, input_ids):
    base = logits(toy(), input_ids)
    torch.manual_seed(0)
    model = peft_core.apply(toy(), config)
    adapted = logits(model, input_ids)
    if isinstance(config, PrefixTuningConfig):  # the prefix changes outputs from the start
        assert adapted.shape == base.shape and not torch.allclose(adapted, base, atol=1e-4)
        with peft_core.disabled(model):
            assert_close(logits(model, input_ids), base)
    else:
        assert_close(adapted, base, atol=1e-6, rtol=0)


def test_two_lists_of_blocks_are_refused_naming_both():
    with pytest.raises(
        ValueError, match=r"cannot tell this model's transformer blocks.*trunk, spare"
    ):
        find_places(toy(spare=True))


def test_two_attentions_in_a_block_are_refused_naming_both():
    with pytest.raises(ValueError, match=r"candidates trunk\.0\.mix, trunk\.0\.twin"):
        find_places(toy(twin=True))
    with pytest.raises(ValueError, match=r"no default LoRA target modules.*trunk\.0\.twin"):
        peft_core.apply(toy(twin=True), LoraConfig())
    assert peft_core.apply(toy(twin=True), LoraConfig(target_modules=("merge",)))
