"""Before launch: the launch forms' estimate panel (trainable parameters, a rough memory figure,
a time from similar past runs), and help text on every field of every launch form."""

import pytest
from django.test import Client
from django.urls import reverse

import peft_core
from peft_core.registry import build_config
from peft_core.tiny import build_tiny
from webapp.experiments import architecture, estimates
from webapp.experiments.forms import AdapterUploadForm, DatasetUploadForm, RunForm, SweepForm
from webapp.experiments.method_forms import METHOD_FORMS, method_defaults
from webapp.experiments.models import RunStatus

pytestmark = pytest.mark.django_db

URL = "/runs/new/estimate/"


@pytest.fixture(autouse=True)
def _empty_model_cache(settings, tmp_path):
    """No model has been used: tiny models come from peft_core.tiny, the others are unknown."""
    settings.MODEL_CACHE_DIR = tmp_path / "cache"


def _form(cast, method="lora", **overrides) -> dict:
    data = {
        "name": "x",
        "project": cast.acme_project.id,
        "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-instructions"].id,
        "method": method,
        "steps": 30,
        "batch_size": 4,
        "learning_rate": 0.001,
        "max_length": 128,
        "eval_every": 10,
    }
    return data | method_defaults(method) | overrides


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _real_count(kind: str, task: str, method: str, config: dict) -> tuple[int, int]:
    model = build_tiny(kind, task=task)
    peft_core.apply(model, build_config(method, config))
    return peft_core.trainable_parameters(model), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", sorted(METHOD_FORMS))
@pytest.mark.parametrize("model_key,kind,task", [("tiny-llama", "llama", "causal-lm")])
def test_the_meta_count_equals_the_real_models_count(method, model_key, kind, task):
    form = METHOD_FORMS[method](method_defaults(method))
    assert form.is_valid(), form.errors
    config = form.config_kwargs()
    count = estimates.parameter_count(
        model_key=model_key, task=task, num_labels=2, method=method, config=config
    )
    assert (count.trainable, count.total) == _real_count(kind, task, method, config)
    assert 0 < count.percent < 100 or (method == "full" and count.percent == 100)


def test_a_classifier_counts_its_head_for_the_datasets_labels():
    config = {"r": 4}
    count = estimates.parameter_count(
        model_key="tiny-bert", task="seq-cls", num_labels=2, method="lora", config=config
    )
    assert (count.trainable, count.total) == _real_count("bert", "seq-cls", "lora", config)


def test_a_count_is_computed_once_then_cached():
    architecture._count.cache_clear()
    kwargs = {"model_key": "tiny-llama", "task": "causal-lm", "num_labels": 2, "method": "ia3"}
    first = estimates.parameter_count(**kwargs, config={})
    second = estimates.parameter_count(**kwargs, config={})
    assert first == second
    assert architecture._count.cache_info().hits == 1


def test_the_panel_shows_the_exact_count_and_the_pre_flight_peak(cast):
    response = _client(cast.alice).get(URL, _form(cast, r=8))
    assert response.status_code == 200
    body = response.content.decode()
    config = METHOD_FORMS["lora"](_form(cast, r=8))
    assert config.is_valid()
    trainable, total = _real_count("llama", "causal-lm", "lora", config.config_kwargs())
    assert f"{trainable:,}" in body and f"{total:,}" in body
    assert 'Peak memory <span class="muted">(pre-flight)</span>' in body
    assert "rough estimate" not in body  # one memory figure, the one the worker acts on
    assert "no similar run yet" in body


def test_a_larger_rank_shows_more_parameters(cast):
    client = _client(cast.alice)
    small = client.get(URL, _form(cast, r=2)).content.decode()
    large = client.get(URL, _form(cast, r=64)).content.decode()
    assert small != large
    counts = [
        estimates.parameter_count(
            model_key="tiny-llama", task="causal-lm", num_labels=2, method="lora", config={"r": r}
        ).trainable
        for r in (2, 64)
    ]
    assert f"{counts[0]:,}" in small and f"{counts[1]:,}" in large


def test_a_gguf_model_never_converted_is_counted_from_its_files_header(cast):
    """A fresh install (nothing converted yet) still shows the exact count: SmolLM2-135M
    (30 layers, hidden 576, 3 key/value heads of 64) with LoRA r=8 on q_proj and v_proj."""
    body = _client(cast.alice).get(URL, _form(cast, base_model="smollm2-135m-instruct", r=8))
    assert body.status_code == 200
    hidden, kv, layers, r = 576, 3 * 64, 30, 8
    lora = layers * (r * (hidden + hidden) + r * (hidden + kv))
    assert lora == 460_800  # what the real run's profile reported on the loaded model
    text = body.content.decode()
    assert f"{lora:,}" in text and "unknown until first use" not in text


def test_a_model_whose_package_is_missing_is_unknown_until_first_use(cast, monkeypatch):
    def missing(spec):
        raise FileNotFoundError(f"model {spec.key!r} needs its package")

    monkeypatch.setattr(architecture, "gguf_source", missing)
    architecture._gguf_config.cache_clear()
    try:
        body = _client(cast.alice).get(URL, _form(cast, base_model="smollm2-135m-instruct"))
    finally:
        architecture._gguf_config.cache_clear()
    assert body.status_code == 200
    assert "unknown until first use" in body.content.decode()


def test_the_memory_formula():
    shape = estimates.Shape(hidden=64, layers=2, vocab=512)
    params = estimates.ParamCount(trainable=1000, total=100_000)
    memory = estimates.memory_estimate(
        shape=shape, params=params, task="causal-lm", batch_size=4, max_length=128, floats=16.0
    )
    assert memory.weights == 4 * 100_000
    assert memory.training_state == 4 * 3 * 1000
    assert memory.activations == 4 * (16 * 512 * 64 * 2 + 3 * 512 * 512)
    classifier = estimates.memory_estimate(
        shape=shape, params=params, task="seq-cls", batch_size=4, max_length=128, floats=16.0
    )
    assert classifier.activations == 4 * 16 * 512 * 64 * 2
    assert memory.total == memory.weights + memory.training_state + memory.activations


def _finished(make_run, *, method="lora", wall_s=60.0, run=None, **profile):
    """A succeeded run of 30 steps at batch 4 × 128 tokens; `run`: other Run fields."""
    return make_run(
        status=RunStatus.SUCCEEDED,
        method=method,
        attempt=1,
        train_config={"steps": 30, "batch_size": 4, "max_length": 128},
        profile={"wall_s": wall_s, **profile},
        **(run or {}),
    )


def test_time_comes_from_the_median_of_similar_runs_scaled_by_batch_and_length(cast, make_run):
    for wall in (30.0, 60.0, 600.0):  # 1, 2 and 20 s per step at batch 4 × 128 tokens
        _finished(make_run, wall_s=wall)
    _finished(make_run, method="ia3", wall_s=6000.0)  # another method: not similar
    # 2 s per step at 4 × 128; asked: 8 × 128 for 60 steps = 4 s × 60 = 4 min
    body = _client(cast.bob).get(URL, _form(cast, batch_size=8, steps=60)).content.decode()
    assert "about 4 min" in body
    assert "from 3 similar runs" in body


def test_time_falls_back_to_the_same_model_with_other_methods(cast, make_run):
    _finished(make_run, method="ia3", wall_s=120.0)  # 4 s per step
    body = _client(cast.alice).get(URL, _form(cast, steps=30)).content.decode()
    assert "about 2 min" in body
    assert "from 1 similar run on this model with other methods" in body


def test_failed_uploaded_and_other_model_runs_are_not_similar(cast, make_run):
    make_run(status=RunStatus.FAILED, profile={"wall_s": 60.0})
    _finished(make_run, run={"external": True})
    _finished(make_run, run={"base_model": "tiny-bert"})
    body = _client(cast.alice).get(URL, _form(cast)).content.decode()
    assert "no similar run yet" in body


def test_another_teams_runs_never_feed_the_estimate(cast, make_run):
    measured = {"peak_memory_mb": 99_999.0, "memory_kind": "cuda"}
    _finished(make_run, total_params=10_000, trainable_params=100, **measured)
    theirs = _form(cast, project=cast.umbrella_project.id)
    mallory = _client(cast.mallory).get(URL, theirs).content.decode()
    assert "no similar run yet" in mallory
    assert "about 2 min" not in mallory
    assert estimates.activation_floats(user=cast.mallory) == estimates.ACTIVATION_FLOATS
    assert estimates.activation_floats(user=cast.alice) != estimates.ACTIVATION_FLOATS


def test_gpu_measured_runs_recalibrate_the_activation_constant(cast, make_run):
    shape = estimates.model_shape("tiny-llama")
    params = estimates.parameter_count(
        model_key="tiny-llama", task="causal-lm", num_labels=2, method="lora", config={"r": 8}
    )
    measured = estimates.memory_estimate(
        shape=shape, params=params, task="causal-lm", batch_size=4, max_length=128, floats=40.0
    )
    profile = {"total_params": params.total, "trainable_params": params.trainable}
    profile |= {"peak_memory_mb": measured.total / 2**20, "memory_kind": "cuda"}
    _finished(make_run, **profile)
    _finished(make_run, **(profile | {"memory_kind": "rss", "peak_memory_mb": 1.0}))  # not used
    assert estimates.activation_floats(user=cast.alice) == pytest.approx(40.0)


GARBAGE = [
    {"r": "abc"},
    {"r": "0"},
    {"r": "-5"},
    {"r": "1e309"},
    {"r": ""},
    {"batch_size": "NaN"},
    {"max_length": "99999999999999999999"},
    {"base_model": "../../etc/passwd"},
    {"method": "nope"},
    {"dataset": "999999"},
    {"dataset": "x'; DROP TABLE"},
    {"steps": ""},
    {"method": "prompt", "num_virtual_tokens": 20, "init": "text", "init_text": ""},
    {"method": "bottleneck", "bottleneck_dim": 8, "placement": "houlsby", "scaling": "3"},
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_invalid_values_ask_to_fix_the_form_and_never_fail(cast, garbage):
    response = _client(cast.alice).get(URL, _form(cast) | garbage)
    assert response.status_code == 200
    assert "Fix the form to see estimates." in response.content.decode()


@pytest.mark.parametrize("data", [{}, {"method": "lora"}, {"r": "8", "batch_size": "4"}])
def test_missing_fields_ask_to_fix_the_form(cast, data):
    response = _client(cast.alice).get(URL, data)
    assert response.status_code == 200
    assert "Fix the form to see estimates." in response.content.decode()


def test_garbage_query_strings_never_fail(cast):
    client = _client(cast.alice)
    for query in ("?%ff%fe=%00", "?grid=" + "x" * 5000, "?methods=lora&grid=lora.r%3D1,2,x"):
        response = client.get(URL + query)
        assert response.status_code == 200
        assert "Fix the form" in response.content.decode()


def test_a_seq_cls_dataset_on_a_causal_only_model_asks_to_fix_the_form(cast):
    data = _form(cast, base_model="smollm2-135m-instruct")
    data["dataset"] = cast.datasets["sample-sentiment"].id
    assert "Fix the form" in _client(cast.alice).get(URL, data).content.decode()


def test_a_sweep_shows_the_per_run_range(cast):
    data = _form(cast) | {"methods": ["lora", "ia3"], "grid": "lora.r = 2, 32"}
    body = _client(cast.alice).get(URL, data).content.decode()
    counts = sorted(
        estimates.parameter_count(
            model_key="tiny-llama", task="causal-lm", num_labels=2, method=m, config=c
        ).trainable
        for m, c in (("lora", {"r": 2}), ("lora", {"r": 32}), ("ia3", {}))
    )
    assert "over 3 runs" in body
    assert f"{counts[0]:,} – {counts[-1]:,}" in body


def test_a_bad_sweep_grid_asks_to_fix_the_form(cast):
    data = _form(cast) | {"methods": ["lora"], "grid": "ia3.r = 1"}
    assert "Fix the form" in _client(cast.alice).get(URL, data).content.decode()


def test_launch_pages_load_the_panel_and_the_method_swap_announces_itself(cast):
    client = _client(cast.alice)
    for page in ("run_new", "sweep_new"):
        body = client.get(reverse(page)).content.decode()
        assert 'hx-get="/runs/new/estimate/"' in body
        assert 'hx-params="not csrfmiddlewaretoken"' in body
    response = client.get(reverse("run_method_fields"), {"method": "prefix"})
    assert response.headers["HX-Trigger-After-Settle"] == '{"method-fields-swapped": {}}'


# ---- help text on every field ---------------------------------------------------------------

LAUNCH_FORMS = [RunForm, SweepForm, DatasetUploadForm, AdapterUploadForm, *METHOD_FORMS.values()]


@pytest.mark.parametrize("form_class", LAUNCH_FORMS, ids=lambda f: f.__name__)
def test_every_field_says_what_it_does(form_class):
    missing = [name for name, f in form_class.base_fields.items() if not str(f.help_text).strip()]
    assert not missing, f"{form_class.__name__}: no help text on {missing}"


@pytest.mark.parametrize("method", sorted(METHOD_FORMS))
def test_every_method_field_renders_its_help_text(cast, method):
    client = _client(cast.alice)
    body = client.get(reverse("run_method_fields"), {"method": method}).content.decode()
    for name in METHOD_FORMS[method].base_fields:
        assert f'id="id_{name}_helptext"' in body, name
        assert f'aria-describedby="id_{name}_helptext"' in body, name


def test_every_launch_field_renders_its_help_text(cast):
    client = _client(cast.alice)
    for page, form_class in (("run_new", RunForm), ("sweep_new", SweepForm)):
        body = client.get(reverse(page)).content.decode()
        for name in form_class.base_fields:
            assert f'id="id_{name}_helptext"' in body, (page, name)
