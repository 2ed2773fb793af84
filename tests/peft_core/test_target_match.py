"""target_match: the torch-free judge of target specs, the same one a live model uses."""

import json
import subprocess
import sys

import pytest

import peft_core
from peft_core.configs import DoraConfig, LoraConfig
from peft_core.inspection import describe
from peft_core.target_match import compact_names, lora_trainable, preview_targets, select_paths
from peft_core.targets import resolve_targets
from tests.peft_core.families import fresh

PATHS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp.down_proj",
    "classifier.dense",
    "classifier.out_proj",
    "lm_head",
]


def test_importing_it_loads_no_torch():
    code = "import sys, peft_core.target_match; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize(
    ("spec", "kwargs", "expected"),
    [
        (None, {"default": [PATHS[1], PATHS[0]]}, PATHS[:2]),  # in the paths' order
        ("all-linear", {"heads": ["classifier"]}, PATHS[:3]),  # a head and what is inside it
        (r"model\.layers\.\d+\.self_attn\.(q|v)_proj", {}, PATHS[:2]),  # regex: fullmatch
        ("q_proj", {}, []),  # a regex, not a name
        (("q_proj", "mlp.down_proj"), {}, [PATHS[0], PATHS[2]]),  # dotted suffixes
        (("proj",), {}, []),  # whole components only
        (("dense", "out_proj"), {"exclude": ("classifier",)}, []),  # modules_to_save's insides
    ],
)
def test_select_paths(spec, kwargs, expected):
    assert select_paths(PATHS, spec, **kwargs) == expected


def test_none_without_default_paths_is_refused():
    with pytest.raises(ValueError, match="default paths"):
        select_paths(PATHS, None)


def test_compact_names_fall_back_to_paths_when_leaves_select_more():
    assert compact_names(PATHS[:2], PATHS) == ["q_proj", "v_proj"]
    assert compact_names(["classifier.dense"], [*PATHS, "model.dense"]) == ["classifier.dense"]


@pytest.mark.parametrize(("kind", "task"), [("qwen3", "causal-lm"), ("roberta", "seq-cls")])
@pytest.mark.parametrize(
    "spec", [None, "all-linear", ("q_proj", "value", "dense"), r".*\.0\..*"], ids=str
)
def test_the_web_preview_is_what_apply_does(kind, task, spec):
    """Rows (as the web stores them) and describe's default give apply's modules and count."""
    model = fresh(kind, task)
    described = json.loads(json.dumps(describe(model)))  # as stored
    rows = described["linears"]
    paths = preview_targets(described, spec)
    assert paths == resolve_targets(model, spec, exclude=_head_names(task))
    for config, dora in ((LoraConfig(r=4, target_modules=spec), False), (DoraConfig(r=2), True)):
        if dora and spec is not None:
            continue
        adapted = peft_core.apply(fresh(kind, task), config)
        trainable = sum(
            p.numel()
            for n, p in adapted.named_parameters()
            if p.requires_grad and "trained_module" not in n
        )
        assert lora_trainable(rows, paths, config.r, dora=dora) == trainable


def _head_names(task: str) -> tuple[str, ...]:
    return ("classifier",) if task == "seq-cls" else ()


def test_a_refused_default_is_refused_in_the_preview_too():
    described = {"linears": [], "methods": {"prefix": {"refused": "no KV cache"}}}
    with pytest.raises(ValueError, match="no KV cache"):
        preview_targets(described, None, method="prefix")
