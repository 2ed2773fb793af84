"""Task metrics chosen at launch (issue 18, item 1): the launch page, the API and sweeps store
TrainConfig.eval_metrics, the dataset's defaults unless the launch names others, and refuse a
metric the dataset's task or rows cannot compute, beside the field, before anything is queued.
A dataset can bring a validation file or a validation share, and shows its split."""

import io
import json

import pytest
from django.urls import reverse

from webapp.experiments import services
from webapp.experiments.method_forms import method_defaults
from webapp.experiments.models import Dataset, Run

pytestmark = pytest.mark.django_db


def _body(cast, dataset=None, **train) -> dict:
    return {
        "base_model": "tiny-llama",
        "dataset": (dataset or cast.datasets["sample-instructions"]).id,
        "method": "lora",
        "train_config": {"steps": 3, **train},
    }


def _launched(api, cast, **train) -> dict:
    response = api(cast.bob).post(reverse("api-runs"), _body(cast, **train), format="json")
    assert response.status_code == 201, response.json()
    return Run.objects.get(id=response.json()["id"]).train_config


def _upload(cast, rows: list[dict], **kwargs) -> Dataset:
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    return services.dataset_upload_create(
        user=cast.alice, team=cast.acme, name="up", filename="rows.jsonl", data=data,
        task=kwargs.pop("task", "causal-lm"), **kwargs,
    )  # fmt: skip


def test_the_dataset_defaults_unless_the_launch_names_others(api, cast):
    # sample-instructions names none (generation is costly on a CPU): the loss alone
    assert "eval_metrics" not in _launched(api, cast)
    assert _launched(api, cast, eval_metrics=["rouge_l", "chrf"])["eval_metrics"] == [
        "rouge_l",
        "chrf",
    ]
    named = _launched(api, cast, eval_metrics="dataset,token_f1")
    assert named["eval_metrics"] == ["token_f1"]
    assert "eval_metrics" not in _launched(api, cast, eval_metrics=[])  # the loss alone
    config = _launched(api, cast, eval_metrics="contains", max_new_tokens=8, eval_batches=2)
    assert (config["max_new_tokens"], config["eval_batches"]) == (8, 2)


@pytest.mark.parametrize(
    ("train", "field", "message"),
    [
        ({"eval_metrics": ["bleu"]}, "eval_metrics", "Select a valid choice. bleu"),
        ({"eval_metrics": ["macro_f1"]}, "eval_metrics", "macro_f1 does not apply to generation"),
        ({"max_new_tokens": 0}, "max_new_tokens", "greater than or equal to 1"),
        ({"max_new_tokens": 513}, "max_new_tokens", "less than or equal to 512"),
        ({"eval_metrics": [{"a": 1}]}, "train_config", "list of up to 16 short names"),
    ],
)
def test_a_metric_the_run_cannot_compute_is_refused(api, cast, train, field, message):
    response = api(cast.bob).post(reverse("api-runs"), _body(cast, **train), format="json")
    assert response.status_code == 400
    assert message in json.dumps(response.json()[field])
    assert not Run.objects.exists()


def test_text_rows_have_no_completion_to_compare_with(api, cast):
    texts = _upload(cast, [{"text": f"line {i}"} for i in range(5)])
    body = _body(cast, dataset=texts, eval_metrics=["exact_match"])
    response = api(cast.bob).post(reverse("api-runs"), body, format="json")
    assert response.status_code == 400
    assert "this dataset has text rows" in response.json()["eval_metrics"][0]
    body = _body(cast, dataset=texts)  # its defaults: none, so the loss alone
    assert api(cast.bob).post(reverse("api-runs"), body, format="json").status_code == 201


def test_the_launch_page_offers_and_stores_the_metrics(client, cast):
    client.force_login(cast.bob)
    page = client.get(reverse("run_new")).content.decode()
    assert "Task metrics" in page and 'value="dataset"' in page and 'value="chrf"' in page
    data = {
        "name": "metrics", "project": cast.acme_project.id, "base_model": "tiny-llama",
        "dataset": cast.datasets["sample-sentiment"].id, "method": "lora",
        "steps": 3, "batch_size": 4, "learning_rate": 2e-4, "max_length": 64, "eval_every": 0,
        **method_defaults("lora"), "eval_metrics": ["dataset"],
    }  # fmt: skip
    response = client.post(reverse("run_new"), data)
    assert response.status_code == 302
    assert Run.objects.get().train_config["eval_metrics"] == ["accuracy", "macro_f1"]
    response = client.post(reverse("run_new"), data | {"eval_metrics": ["exact_match"]})
    assert response.status_code == 400
    assert "exact_match does not apply to classification" in response.content.decode()


def test_every_run_of_a_sweep_scores_the_same_metrics(api, cast):
    body = {
        "base_model": "tiny-llama", "dataset": cast.datasets["sample-instructions"].id,
        "methods": ["lora", "ia3"], "train_config": {"steps": 2, "eval_metrics": "chrf"},
    }  # fmt: skip
    response = api(cast.bob).post(reverse("api-sweeps"), body, format="json")
    assert response.status_code == 201, response.json()
    assert [run.train_config["eval_metrics"] for run in Run.objects.all()] == [["chrf"]] * 2


# ---- a dataset's split and default metrics ------------------------------------------------


def _rows(count: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(start, start + count)]


def test_a_validation_file_is_the_validation_split(cast):
    validation = "".join(json.dumps(row) + "\n" for row in _rows(3, start=100)).encode()
    dataset = _upload(
        cast, _rows(12), validation=("val.jsonl", validation), eval_metrics=["token_f1"]
    )
    assert (dataset.row_count, dataset.val_row_count, dataset.split_sizes) == (15, 3, (12, 3))
    assert dataset.default_eval_metrics == ["token_f1"]
    from workers.training import dataset_rows

    train, val = dataset_rows(dataset)
    assert [row["prompt"] for row in val] == ["q100", "q101", "q102"]
    assert len(train) == 12 and {row["prompt"] for row in train} == {f"q{i}" for i in range(12)}


def test_a_validation_share_is_held_out_at_random(cast):
    dataset = _upload(cast, _rows(40), val_fraction=0.25)
    assert dataset.split_sizes == (30, 10)
    from workers.training import dataset_rows

    train, val = dataset_rows(dataset)
    assert (len(train), len(val)) == (30, 10)
    assert {row["prompt"] for row in train + val} == {f"q{i}" for i in range(40)}
    assert cast.datasets["sample-instructions"].split_sizes == (2160, 240)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"validation": ("v.csv", b"text\nx\n")}, "the validation file: its columns are text"),
        (
            {"validation": ("v.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": \n')},
            "the validation file: line 2, column 1: invalid JSON",
        ),
        ({"validation": ("v.txt", b"")}, "Upload a .csv or .jsonl file."),
        ({"val_fraction": 0.9}, "The validation share must be 0.01 to 0.5."),
        ({"eval_metrics": ["accuracy"]}, "accuracy does not apply to generation"),
    ],
)
def test_a_bad_split_or_metric_stores_nothing(cast, kwargs, message):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        _upload(cast, _rows(5), **kwargs)
    assert not Dataset.objects.filter(team=cast.acme).exists()


def test_the_pages_and_the_api_upload_and_show_the_split(client, api, cast):
    client.force_login(cast.alice)
    files = {
        "file": _file("train.jsonl", _rows(8)),
        "validation_file": _file("val.jsonl", _rows(2, start=50)),
    }
    form = {"name": "qa", "team": cast.acme.id, "task": "causal-lm", "eval_metrics": ["chrf"]}
    response = client.post(reverse("dataset_upload"), form | files)
    assert response.status_code == 302, response.content.decode()[-2000:]
    dataset = Dataset.objects.get(name="qa")
    page = client.get(reverse("dataset_detail", args=[dataset.id])).content.decode()
    assert "Split: 8 training rows, 2 validation rows" in page and "<code>chrf</code>" in page
    data = api(cast.alice).get(reverse("api-dataset", args=[dataset.id])).json()
    assert (data["train_rows"], data["validation_rows"], data["eval_metrics"]) == (8, 2, ["chrf"])

    body = {"name": "qa2", "team": cast.acme.id, "task": "causal-lm", "val_fraction": "0.2"}
    body |= {"eval_metrics": "exact_match,rouge_l", "file": _file("rows.jsonl", _rows(10))}
    response = api(cast.alice).post(reverse("api-datasets"), body, format="multipart")
    assert response.status_code == 201, response.json()
    data = response.json()
    assert (data["train_rows"], data["validation_rows"]) == (8, 2)
    assert data["eval_metrics"] == ["exact_match", "rouge_l"]


def _file(name: str, rows: list[dict]):
    upload = io.BytesIO("".join(json.dumps(row) + "\n" for row in rows).encode())
    upload.name = name
    return upload
