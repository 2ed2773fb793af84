"""Every peft_core method has a launch form whose defaults build a valid config, and back."""

import pytest

import peft_core
from webapp.experiments.method_forms import METHOD_FORMS, expand_sweep, method_defaults


def test_every_method_is_offered():
    assert set(METHOD_FORMS) == set(peft_core.METHOD_CONFIGS)


@pytest.mark.parametrize("method", sorted(METHOD_FORMS))
def test_defaults_build_a_config_with_help_on_every_field(method):
    form = METHOD_FORMS[method](method_defaults(method))
    assert form.is_valid(), form.errors
    config = peft_core.build_config(method, form.config_kwargs())
    assert isinstance(config, peft_core.METHOD_CONFIGS[method])
    assert form.summary and all(field.help_text for field in form)


@pytest.mark.parametrize(
    ("method", "data", "field"),
    [
        ("prompt", {"num_virtual_tokens": 8, "init": "text", "init_text": ""}, "init_text"),
        ("prompt", {"num_virtual_tokens": 0, "init": "random"}, "num_virtual_tokens"),
        ("bottleneck", {"placement": "houlsby", "bottleneck_dim": 8, "activation": "relu",
                        "scaling": 4, "dropout": 0}, "scaling"),
        ("prefix", {"num_virtual_tokens": 10, "projection_dim": -1}, "projection_dim"),
    ],
)  # fmt: skip
def test_bad_values_are_named(method, data, field):
    form = METHOD_FORMS[method](data)
    assert not form.is_valid() and field in form.errors


def test_prefix_width_zero_means_no_reparameterisation():
    form = METHOD_FORMS["prefix"]({"num_virtual_tokens": 10, "projection_dim": 0})
    assert form.is_valid()
    assert peft_core.build_config("prefix", form.config_kwargs()).projection_dim is None


def test_compare_all_methods_preset_expands_to_nine_runs():
    items = expand_sweep(
        list(METHOD_FORMS), {"bottleneck.placement": ["houlsby", "pfeiffer", "parallel"]}
    )
    assert [i.label for i in items] == [
        "lora",
        "dora",
        "ia3",
        "prompt",
        "prefix",
        "bottleneck placement=houlsby",
        "bottleneck placement=pfeiffer",
        "bottleneck placement=parallel",
        "mam",
    ]
