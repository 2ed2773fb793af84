"""Every peft_core method has a launch form drawn from its config: the same bounds, defaults
and help, and the config judges every value (page, API, sweep) before anything is queued."""

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

import peft_core
from peft_core.checks import settings
from peft_core.cli import parse_method_config
from webapp.experiments.method_forms import (
    METHOD_FORMS,
    OptionalCountField,
    expand_sweep,
    method_defaults,
)
from webapp.experiments.models import Run


def test_every_method_is_offered():
    assert set(METHOD_FORMS) == set(peft_core.METHOD_CONFIGS)


@pytest.mark.parametrize("method", sorted(METHOD_FORMS))
def test_defaults_build_a_config_with_help_on_every_field(method):
    form = METHOD_FORMS[method](method_defaults(method))
    assert form.is_valid(), form.errors
    config = peft_core.build_config(method, form.config_kwargs())
    assert isinstance(config, peft_core.METHOD_CONFIGS[method])
    assert form.summary and all(field.help_text for field in form)


# Form fields that offer a few choices where the config takes more (a regex, a list).
PRESENTATIONAL = {"target_modules"}


def _config_fields(method: str) -> list[tuple[str, object, object]]:
    """(name, default, Setting) of the config fields the method's form shows as they are."""
    form_fields = set(METHOD_FORMS[method].base_fields) - PRESENTATIONAL
    declared = settings(peft_core.METHOD_CONFIGS[method])
    return [(name, *declared[name]) for name in form_fields if name in declared]


@pytest.mark.parametrize("method", sorted(METHOD_FORMS))
def test_form_fields_are_the_configs_bounds_defaults_and_help(method):
    form_fields = METHOD_FORMS[method].base_fields
    for name, default, rule in _config_fields(method):
        field = form_fields[name]
        assert (field.label, field.initial) == (rule.label, default), name
        assert field.help_text.startswith(rule.help), name
        assert field.required == (rule.none_means is None and rule.kind is not bool), name
        assert getattr(field, "min_value", None) == rule.low, name
        assert getattr(field, "max_value", None) == rule.high, name
        assert list(getattr(field, "choices", [])) == list(rule.choices), name
        assert getattr(field, "max_length", None) == rule.max_chars, name


def test_every_setting_with_bounds_is_on_a_form_or_named_here():
    """A config field the web does not offer is a decision, listed here, not an oversight."""
    not_offered = {
        "bottleneck": {"reduction_factor"},
        "mam": {"reduction_factor", "dropout"},
        "prompt": set(),
    }
    for method, form in METHOD_FORMS.items():
        config_cls = peft_core.METHOD_CONFIGS[method]
        checked = {name for name, (_, rule) in settings(config_cls).items() if rule.kind}
        assert checked - set(form.base_fields) == not_offered.get(method, set()), method


def test_form_title_and_defaults_are_the_configs_and_the_clis():
    for method, form in METHOD_FORMS.items():
        config_cls = peft_core.METHOD_CONFIGS[method]
        assert form.title == config_cls.title
        cli_default = parse_method_config(config_cls, [])
        form_default = form(method_defaults(method))
        assert form_default.is_valid(), form_default.errors
        built = peft_core.build_config(method, form_default.config_kwargs())
        assert built == cli_default, method  # one default for the CLI, the form and the API
    assert METHOD_FORMS["lora"].base_fields["dropout"].initial == 0.05


def test_optional_counts_take_blank_or_zero_as_none():
    for value in ("", "0"):
        form = METHOD_FORMS["prefix"]({"num_virtual_tokens": 10, "projection_dim": value})
        assert form.is_valid(), form.errors
        assert form.cleaned_data["projection_dim"] is None
    assert isinstance(METHOD_FORMS["bottleneck"].base_fields["bottleneck_dim"], OptionalCountField)


@pytest.mark.parametrize(
    ("method", "data", "field", "message"),
    [
        ("lora", {"alpha": 0}, "alpha", "LoRA alpha must be a number in (0, 10000]"),
        ("dora", {"dropout": 1}, "dropout", "DoRA dropout must be a number in [0, 1)"),
        ("bottleneck", {"placement": "pfeiffer", "scaling": 4}, "scaling", "parallel adapters"),
        ("prompt", {"init": "text", "init_text": ""}, "init_text", 'init="text" needs'),
        ("mam", {"scaling": 0}, "scaling", "MAM adapter scaling must be a number in (0, 100]"),
    ],
)
def test_a_value_only_the_config_refuses_is_an_error_on_its_field(method, data, field, message):
    form = METHOD_FORMS[method]({**method_defaults(method), **data})
    assert not form.is_valid()
    assert list(form.errors) == [field]
    assert message in form.errors[field][0]


def test_a_sweep_item_the_config_refuses_is_refused_by_name():
    with pytest.raises(ValidationError, match="alpha: LoRA alpha must be a number"):
        expand_sweep(["lora"], {"lora.alpha": ["8", "0"]})


@pytest.mark.django_db
def test_the_page_shows_the_configs_refusal_and_creates_nothing(client, cast):
    data = {
        "name": "first run",
        "project": cast.acme_project.id,
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "method": "lora",
        **{"steps": 30, "batch_size": 4, "learning_rate": 2e-4, "max_length": 128},
        **{"eval_every": 10, **method_defaults("lora"), "alpha": 0},
    }
    client.force_login(cast.alice)
    response = client.post(reverse("run_new"), data)
    assert response.status_code == 400
    errors = response.context["method_form"].errors
    assert errors == {"alpha": ["LoRA alpha must be a number in (0, 10000], got 0.0"]}
    assert "LoRA alpha must be a number in (0, 10000], got 0.0" in response.content.decode()
    assert not Run.objects.exists()


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


def test_compare_all_methods_preset_expands_to_ten_runs():
    """Every method, full fine-tuning last: the reference the others are measured against."""
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
        "full",
    ]


@pytest.mark.parametrize("method", ["lora", "bottleneck", "mam", "prompt"])
def test_a_method_without_a_hand_made_form_gets_one_from_its_config(method):
    """A new method needs no web edit: its form comes from its config's settings."""
    from webapp.experiments.method_forms import form_settings, generic_method_form

    form_class = generic_method_form(method)
    config_cls = peft_core.METHOD_CONFIGS[method]
    assert form_class.title == config_cls.title and form_class.summary
    assert list(form_class.base_fields) == form_settings(config_cls)
    assert "modules_to_save" not in form_class.base_fields  # a list: the CLI and API take it
    form = form_class(method_defaults(method) | _initial(form_class))
    assert form.is_valid(), form.errors
    assert isinstance(peft_core.build_config(method, form.config_kwargs()), config_cls)
    refused = form_class(_initial(form_class) | {"dropout": "1.0"})
    if "dropout" in form_class.base_fields:
        assert not refused.is_valid() and "dropout" in refused.errors


def _initial(form_class) -> dict:
    return {
        name: str(field.initial)
        for name, field in form_class.base_fields.items()
        if field.initial is not None and field.initial is not False  # 0.0 is a value
    }
