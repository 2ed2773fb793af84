"""The torch-free half of peft_core: configs that judge their own values and name the field,
one method list behind the registry and model.METHODS, and imports that never load torch."""

import json
import subprocess
import sys

import pytest

import peft_core
from peft_core import model as peft_model
from peft_core import prompt_tuning
from peft_core.bottleneck import ACTIVATIONS
from peft_core.checks import ConfigError, names_tuple, settings
from peft_core.configs import (
    INITS,
    BottleneckConfig,
    DoraConfig,
    IA3Config,
    LoraConfig,
    MAMConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TrainConfig,
)
from peft_core.methods import METHOD_LIST
from peft_core.registry import METHOD_CONFIGS
from tests.peft_core.method_cases import CASES


def _modules_loaded_after(code: str) -> set[str]:
    """Which of torch and transformers a fresh interpreter has imported after `code`."""
    report = "print(json.dumps(sorted({'torch', 'transformers'} & set(sys.modules))))"
    probe = f"import json, sys\n{code}\n{report}"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    return set(json.loads(result.stdout))


def test_what_the_web_imports_loads_no_torch():
    code = (
        "import peft_core.registry, peft_core.configs, peft_core.catalogue, peft_core.data, "
        "peft_core.samples, peft_core.checks, peft_core.methods\n"
        "from peft_core import LoraConfig, METHOD_CONFIGS, build_config\n"
        "build_config('lora', {'r': 4}); METHOD_CONFIGS['mam'].mergeable\n"
        "peft_core.catalogue.get_spec('tiny-llama'); peft_core.data.parse_dataset"
    )
    assert _modules_loaded_after(code) == set()


def test_the_package_loads_the_model_code_on_first_use():
    assert _modules_loaded_after("import peft_core; peft_core.apply") >= {"torch"}
    assert peft_core.LoraConfig is LoraConfig and peft_core.model is peft_model
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        peft_core.nothing  # noqa: B018


def test_the_method_list_is_behind_the_registry_and_the_model():
    assert list(METHOD_CONFIGS) == [entry.key for entry in METHOD_LIST]
    assert [m.config_cls for m in peft_model.METHODS] == [e.config_cls for e in METHOD_LIST]
    assert [m.name for m in peft_model.METHODS] == [e.config_cls.title for e in METHOD_LIST]


def test_mergeable_is_said_once_on_the_config_and_the_battery_agrees():
    for case in CASES:
        config = case.config("llama", "causal-lm")
        assert type(config).mergeable == case.mergeable, case.id
    mergeable = {key for key, config_cls in METHOD_CONFIGS.items() if config_cls.mergeable}
    assert mergeable == {"lora", "dora", "ia3"}


def test_choices_match_what_the_method_files_implement():
    assert tuple(ACTIVATIONS) == settings(BottleneckConfig)["activation"][1].values
    assert tuple(prompt_tuning.HF_INITS) == INITS


def test_mam_fields_keep_the_bounds_of_the_halves_they_feed():
    mam = settings(MAMConfig)
    halves = settings(BottleneckConfig) | settings(PrefixTuningConfig)
    for name, (_, rule) in mam.items():
        if name != "modules_to_save":
            assert (rule.low, rule.high, rule.choices) == (
                halves[name][1].low,
                halves[name][1].high,
                halves[name][1].choices,
            ), name
    assert (mam["num_virtual_tokens"][0], mam["scaling"][0]) == (30, 4.0)


@pytest.mark.parametrize(
    ("config_cls", "kwargs", "field", "message"),
    [
        (LoraConfig, {"r": 2000}, "r", "LoRA r must be an integer in 1..1024, got 2000"),
        (DoraConfig, {"alpha": 0}, "alpha", "DoRA alpha must be a number in (0, 10000]"),
        (LoraConfig, {"dropout": 1.0}, "dropout", "LoRA dropout must be a number in [0, 1)"),
        (LoraConfig, {"use_rslora": 1}, "use_rslora", "must be true or false"),
        (LoraConfig, {"target_modules": "("}, "target_modules", "not a valid regex"),
        (LoraConfig, {"modules_to_save": [""]}, "modules_to_save", "non-empty strings"),
        (IA3Config, {"feedforward_modules": "all-linear"}, "feedforward_modules", "all-linear"),
        (PromptTuningConfig, {"init": "zeros"}, "init", "one of random, vocab, text"),
        (PromptTuningConfig, {"init": "text"}, "init_text", 'init="text" needs an init_text'),
        (PromptTuningConfig, {"init": "text", "init_text": "x" * 1001}, "init_text", "1000"),
        (PromptTuningConfig, {"init_token_ids": (-1,)}, "init_token_ids", "non-negative"),
        (PrefixTuningConfig, {"projection_dim": 0}, "projection_dim", "1..65536"),
        (BottleneckConfig, {"bottleneck_dim": 8, "reduction_factor": 4}, "bottleneck_dim", "one"),
        (BottleneckConfig, {"scaling": 2.0}, "scaling", "parallel adapters only"),
        (MAMConfig, {"dropout": -0.1}, "dropout", "MAM adapter dropout must be"),
        (TrainConfig, {"steps": 0}, "steps", "steps must be an integer in 1..1000000, got 0"),
        (TrainConfig, {"steps": 5, "warmup_steps": 6}, "warmup_steps", "at most steps (5)"),
        (TrainConfig, {"grad_clip": float("inf")}, "grad_clip", "a finite number >= 0"),
    ],
)
def test_a_refusal_names_its_field(config_cls, kwargs, field, message):
    with pytest.raises(ConfigError) as refused:
        config_cls(**kwargs)
    assert refused.value.field == field
    assert message in str(refused.value)


@pytest.mark.parametrize("config_cls", [*METHOD_CONFIGS.values(), TrainConfig])
def test_every_default_passes_its_own_bounds(config_cls):
    config = config_cls()
    for name, (default, rule) in settings(config_cls).items():
        if rule.kind is not None and name != "reduction_factor":  # None becomes 16 here
            assert getattr(config, name) == default
            assert default is None or rule.accepts(default), name


def test_names_are_deduplicated_in_order():
    assert names_tuple(["v", "q", "v"]) == ("v", "q")
    assert names_tuple("score") == ("score",)
