"""Target resolution: architecture defaults, suffix names, regex, all-linear, helpful errors."""

import pytest

from peft_core.targets import classifier_head, compact_target_names, resolve_targets
from peft_core.tiny import build_tiny

LLAMA_LINEAR_NAMES = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"


@pytest.mark.parametrize(
    "kind,task,leaves",
    [
        ("llama", "causal-lm", {"q_proj", "v_proj"}),
        ("gpt2", "causal-lm", {"c_attn"}),
        ("bert", "seq-cls", {"query", "value"}),
    ],
)
def test_default_targets_per_architecture(kind, task, leaves):
    paths = resolve_targets(build_tiny(kind, task), None)
    assert len(paths) == 2 * len(leaves)  # two layers
    assert {p.rsplit(".", 1)[-1] for p in paths} == leaves


def test_all_linear_leaves_out_output_heads():
    for kind, task, head in [("llama", "causal-lm", "lm_head"), ("bert", "seq-cls", "classifier")]:
        paths = resolve_targets(build_tiny(kind, task), "all-linear")
        assert head not in {p.rsplit(".", 1)[-1] for p in paths}
    assert "bert.pooler.dense" in resolve_targets(build_tiny("bert", "seq-cls"), "all-linear")
    assert len(resolve_targets(build_tiny("gpt2", "seq-cls"), "all-linear")) == 2 * 4


def test_suffix_names_match_whole_components_only():
    model = build_tiny("gpt2")
    assert len(resolve_targets(model, ("c_proj",))) == 4  # attn.c_proj and mlp.c_proj
    assert resolve_targets(model, ("mlp.c_proj",)) == [
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_proj",
    ]
    with pytest.raises(ValueError):
        resolve_targets(model, ("proj",))


def test_regex_is_fullmatched_against_the_path():
    model = build_tiny("llama")
    regex = r"model\.layers\.0\.self_attn\.(q|v)_proj"
    assert resolve_targets(model, regex) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    with pytest.raises(ValueError):
        resolve_targets(model, "q_proj")  # a str is a regex on the full path


@pytest.mark.parametrize("spec", [("query",), "nothing.*", ("self_attn",)])
def test_target_not_found_lists_the_linear_module_names(spec):
    with pytest.raises(ValueError) as error:
        resolve_targets(build_tiny("llama"), spec)
    assert LLAMA_LINEAR_NAMES in str(error.value)


def test_an_unlisted_model_type_gets_its_defaults_from_its_structure():
    model = build_tiny("llama")
    model.config.model_type = "mystery"
    assert {p.rsplit(".", 1)[-1] for p in resolve_targets(model, None)} == {"q_proj", "v_proj"}


def test_a_model_whose_blocks_cannot_be_told_needs_explicit_targets():
    model = build_tiny("llama")
    model.config.num_hidden_layers = 3  # no ModuleList of 3 blocks
    with pytest.raises(ValueError, match="no default LoRA target modules"):
        resolve_targets(model, None)
    assert resolve_targets(model, ("o_proj",))


def test_classifier_head_only_for_sequence_classification():
    assert classifier_head(build_tiny("bert", "seq-cls")) == "classifier"
    assert classifier_head(build_tiny("llama", "seq-cls")) == "score"
    assert classifier_head(build_tiny("gpt2", "seq-cls")) == "score"
    assert classifier_head(build_tiny("llama")) is None


def test_compact_names_fall_back_to_paths_when_leaf_names_select_more():
    model = build_tiny("llama")
    assert compact_target_names(model, resolve_targets(model, None)) == ["q_proj", "v_proj"]
    layer0 = resolve_targets(model, r"model\.layers\.0\..*")
    assert compact_target_names(model, layer0) == sorted(layer0)
