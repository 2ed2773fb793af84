"""A run scores its task metrics beside the loss: base_eval_<name> at step 0 and eval_<name> at
every evaluation, in its metrics and summary. The base model's evaluation is measured once
per team and set of inputs and reused by later runs on any worker, which say so in their log."""

import pytest
import torch

from peft_core.configs import TrainConfig
from webapp.experiments.base_evals import base_eval_key
from webapp.experiments.models import BaseEvaluation, MetricPoint, Run, RunStatus
from workers.models import weights_of
from workers.training import base_eval_parts, execute_run

pytestmark = pytest.mark.django_db
TRAIN = {"steps": 2, "batch_size": 2, "max_length": 48, "eval_every": 1, "eval_batches": 1}


def _run(cast, project=None, **train) -> Run:
    run = Run.objects.create(
        project=project or cast.acme_project,
        name="metrics",
        created_by=cast.alice,
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
        method_config={"r": 4},
        train_config=TRAIN | {"eval_metrics": ["exact_match", "chrf"], "max_new_tokens": 4} | train,
        total_steps=2,
    )
    assert execute_run(run.id, worker="test") == "succeeded"
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    return run


def _points(run: Run, key: str) -> dict[int, float]:
    return dict(MetricPoint.objects.filter(run=run, key=key).values_list("step", "value"))


def test_task_metrics_are_scored_and_the_base_evaluation_is_reused(cast):
    first = _run(cast)
    for name in ("exact_match", "chrf"):
        assert sorted(_points(first, f"base_eval_{name}")) == [0]
        assert sorted(_points(first, f"eval_{name}")) == [1, 2]
        for key in (f"base_eval_{name}", f"eval_{name}"):
            assert 0.0 <= first.summary[key] <= 1.0
    assert first.summary["eval_chrf"] == _points(first, "eval_chrf")[2]
    assert "evaluating the base model on 240 validation rows" in first.log
    assert "base model (" in first.log and "reused" not in first.log

    second = _run(cast)
    assert f"base model: reused from run {first.id}" in second.log
    for key in ("base_eval_loss", "base_eval_exact_match", "base_eval_chrf"):
        assert second.summary[key] == first.summary[key]
        assert _points(second, key) == _points(first, key)
    stored = BaseEvaluation.objects.get()  # one, measured by the first run
    assert stored.run_id == first.id and stored.seconds > 0
    assert stored.metrics == {k[5:]: v for k, v in first.summary.items() if k.startswith("base_")}
    # The base's sample answers come with its evaluation, kept and reused: the measurement
    # after training generates the adapter's side alone.
    assert stored.answers == [s["base"] for s in first.profile["samples"]] and stored.answers
    assert [s["base"] for s in second.profile["samples"]] == stored.answers


def test_the_base_evaluation_is_keyed_by_all_it_depends_on(cast):
    run = Run(
        project=cast.acme_project, base_model="tiny-llama", method="lora",
        dataset=cast.datasets["sample-instructions"], train_config=TRAIN,
    )  # fmt: skip
    weights = weights_of(run.base_model, None)
    config = TrainConfig(**TRAIN)

    def key(run=run, config=config, labels=None, dtype=torch.float32):
        return base_eval_key(base_eval_parts(run, weights, config, labels, dtype))

    same = key()
    assert key(config=TrainConfig(**TRAIN)) == same
    assert key(config=TrainConfig(**TRAIN | {"seed": 3, "steps": 9, "learning_rate": 0.1})) == same
    for changed in (
        {"max_new_tokens": 5}, {"eval_metrics": ["chrf"]}, {"eval_batches": 2},
        {"batch_size": 4}, {"max_length": 64}, {"precision": "bf16"}, {"measure": "full"},
    ):  # fmt: skip
        assert key(config=TrainConfig(**TRAIN | changed)) != same, changed
    assert key(dtype=torch.bfloat16) != same
    umbrella = Run(**{f: getattr(run, f) for f in ("base_model", "method", "dataset")})
    umbrella.project = cast.umbrella_project
    assert key(run=umbrella) != same  # never another team's
    other = Run(project=cast.acme_project, dataset=cast.datasets["sample-sentiment"])
    assert key(run=other) != same
