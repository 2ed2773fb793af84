"""What a finished run exports beside its adapter files: a model card and the merged model.

model_card(run)        README.md for the adapter zip (and, merged=True, for the merged model):
                       YAML front matter as the Hugging Face Hub reads it, then the run in
                       Markdown: base model, method and its config, training settings, the
                       dataset and its sha256, metrics, and how to load the files.
merged_export_*       for a mergeable method (LoRA, DoRA, (IA)³): the adapter folded into the
                       base model's weights, in the base's own dtype, a plain transformers
                       directory (config.json, safetensors shards and their index, tokenizer,
                       README.md) that loads with AutoModelFor*.from_pretrained, no PEFT. A
                       worker builds it on the `export` queue (workers/exports.py) and puts
                       each file in the artifact store; the run's `merged` artifacts record
                       them as one version (a rebuild adds the next) and are served like the
                       adapter, newest version first. This module never loads a model: the
                       web process imports it.

Every user string (run, dataset and project names, notes, method config values) reaches the
card through `_yaml` (always double-quoted, escaped: it cannot end the front matter or add a
key) or `_md` (HTML-escaped and Markdown-escaped: it cannot add markup when rendered).
"""

import dataclasses
import html
import json
import re
import unicodedata
from datetime import timedelta
from typing import Any

import yaml
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Max, QuerySet
from django.utils import timezone

from peft_core.catalogue import CATALOGUE, upstream_name
from peft_core.configs import TrainConfig
from peft_core.registry import METHOD_CONFIGS, build_config, whole_model
from webapp.experiments import queue
from webapp.experiments.artifacts import (
    ArtifactDamaged,
    artifact_file,
    artifact_record,
    next_version,
    version_files,
)
from webapp.experiments.comparison import flat_settings
from webapp.experiments.models import (
    EXPORT_BUSY_STATUSES,
    Artifact,
    ArtifactKind,
    ExportStatus,
    MergedExport,
    Run,
    RunStatus,
    TaskType,
)
from webapp.experiments.store import Stored, store_delete, store_folder, store_walk

MODEL_CARD = "README.md"
# The Hub ids of the catalogue's pretrained models (their files come from pip packages here).
HUB_IDS = {key: spec.hub_id for key, spec in CATALOGUE.items() if spec.hub_id}
PIPELINE_TAGS = {TaskType.CAUSAL_LM: "text-generation", TaskType.SEQ_CLS: "text-classification"}
AUTO_CLASSES = {
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
}


def method_title(method: str) -> str:
    """The method's name for people ("LoRA"), or the stored key when it is not ours."""
    config_cls = METHOD_CONFIGS.get(method)
    return config_cls.title if config_cls else method


def mergeable(method: str) -> bool:
    config_cls = METHOD_CONFIGS.get(method)
    return bool(config_cls and config_cls.mergeable)


def base_model_id(key: str) -> str:
    """What `base_model:` names: the Hub id of a catalogue model, else the catalogue key."""
    return upstream_name(key)


def registered_weights(run: Run) -> dict | None:
    """The run's base weights when they are a team's own model (a directory or a Hub id)."""
    weights = run.base_weights or {}
    return weights if weights.get("source") in ("local", "hub") else None


def base_model_ref(run: Run) -> str:
    """What loads the run's base anywhere: a registered model's Hub id or directory, a bundled
    model's Hub twin, else the catalogue key."""
    weights = registered_weights(run)
    return weights["location"] if weights else base_model_id(run.base_model)


# ---- escaping --------------------------------------------------------------------------------


class _QuotedDumper(yaml.SafeDumper):
    """Every string double-quoted (newlines, '---', '#', ':' and quotes become escapes) but
    for plain words and ids, which PyYAML still quotes where they would read as another type."""


_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")  # no number, in any YAML version


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = None if _PLAIN.fullmatch(text) else '"'
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_QuotedDumper.add_representer(str, _represent_str)


def _yaml(data: dict[str, Any]) -> str:
    """Block YAML, one line per scalar; '<' and '>' as escapes, so no renderer sees a tag."""
    text = yaml.dump(
        data, Dumper=_QuotedDumper, allow_unicode=False, sort_keys=False, width=float("inf")
    )
    # Only double-quoted scalars can hold these (our keys do not): there \x3C reads as '<'.
    return text.replace("<", "\\x3C").replace(">", "\\x3E")


_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}|#!~])")


def _md(value: Any) -> str:
    """One line of text that renders as itself: no HTML, no Markdown markup, no line breaks."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = "".join(c for c in text if unicodedata.category(c)[0] != "C" or c in "\t\n")
    text = " ".join(text.split())  # newlines and U+2028 alike become one space
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def _py(text: str) -> str:
    """A Python string literal for a code block: no backtick can close the block, no '<'."""
    return json.dumps(text).replace("`", "\\u0060").replace("<", "\\u003c")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
    return lines


# ---- the model card --------------------------------------------------------------------------


def model_card(run: Run, *, merged: bool = False) -> str:
    """README.md of the run's adapter (or, merged=True, of its merged model)."""
    sections = [
        _title(run, merged),
        _base_model_section(run),
        _method_section(run),
        _training_section(run),
        _dataset_section(run),
        _results_section(run),
        _usage_section(run, merged),
        _notes_section(run),
        ["Trained with PEFT Lab."],
    ]
    body = "\n\n".join("\n".join(lines) for lines in sections if lines)
    return f"---\n{_yaml(_metadata(run, merged))}---\n\n{body}\n"


def _metadata(run: Run, merged: bool) -> dict[str, Any]:
    """The front matter: the Hub's keys first, then ours under `peftlab`."""
    dataset = run.dataset
    meta: dict[str, Any] = {
        "library_name": "transformers" if merged else "peft",
        "base_model": base_model_ref(run),
        "base_model_relation": "finetune" if merged else "adapter",
        "pipeline_tag": PIPELINE_TAGS.get(run_task(run), "text-generation"),
        "tags": ["peft", run.method, "peftlab", *(["merged"] if merged else [])],
        "model_name": run.name,
    }
    meta["peftlab"] = {
        "run_id": run.id,
        "run_name": run.name,
        "method": run.method,
        "catalogue_model": run.base_model,
        "dataset": dataset.name if dataset else None,
        "dataset_rows": dataset.row_count if dataset else None,
        "dataset_sha256": (dataset.sha256 or None) if dataset else None,
        "builtin_dataset": (dataset.builtin_key or None) if dataset else None,
    }
    return meta


# What HF PEFT's task_type says of the task (adapter_config.json), for a run with no dataset.
HF_TASK_TYPES = {"CAUSAL_LM": TaskType.CAUSAL_LM, "SEQ_CLS": TaskType.SEQ_CLS}


def run_task(run: Run) -> str:
    """The run's task: its dataset's, else (a run trained elsewhere that named none) the
    task_type of its stored adapter_config.json, else causal LM."""
    if run.dataset is not None:
        return run.dataset.task
    try:
        data = artifact_file(run_id=run.id, kind=ArtifactKind.ADAPTER, name="adapter_config.json")
        task_type = json.loads(data).get("task_type") if data is not None else None
    except (ArtifactDamaged, ValueError, AttributeError):
        task_type = None
    return HF_TASK_TYPES.get(task_type, TaskType.CAUSAL_LM)


def _title(run: Run, merged: bool) -> list[str]:
    method_name, base = _md(method_title(run.method)), _md(run.base_model)
    what = (
        f"{base} with a {method_name} adapter merged into its weights"
        if merged
        else f"A {method_name} adapter for {base}"
    )
    return [
        f"# {_md(run.name)}",
        "",
        f"{what}: run {run.id} of project {_md(run.project.name)} in PEFT Lab.",
    ]


def _base_model_section(run: Run) -> list[str]:
    weights = registered_weights(run)
    if weights:
        rows = [("Name", run.base_model), ("Source", weights["source"])]
        rows += [("Hub id" if weights["source"] == "hub" else "Directory", weights["location"])]
        if weights.get("commit"):
            rows.append(("Commit", weights["commit"]))
        rows.append(("Config + weights index sha256", weights.get("content_sha256", "")))
        return ["## Base model", "", *_table(("", ""), rows)]
    spec = CATALOGUE.get(run.base_model)
    rows: list[tuple[str, str]] = [("Catalogue key", run.base_model)]
    if spec is not None:
        rows += [("Title", spec.title), ("Source", spec.source)]
    if run.base_model in HUB_IDS:
        rows.append(("Hub id", HUB_IDS[run.base_model]))
    lines = ["## Base model", "", *_table(("", ""), rows)]
    if spec is not None:
        lines += ["", _md(spec.description)]
    return lines


def _method_config(run: Run) -> dict[str, Any]:
    """The method's full config (defaults filled in), or the stored fields if it is refused.
    An architecture default (target_modules None) reads as the modules the saved adapter
    config lists, as HF PEFT will see them."""
    try:
        config = dataclasses.asdict(build_config(run.method, run.method_config))
    except (TypeError, ValueError):
        return dict(run.method_config)
    if "target_modules" in config and config["target_modules"] is None:
        config["target_modules"] = _saved_targets(run) or "the architecture's default"
    return config


def _saved_targets(run: Run) -> list[str] | None:
    """target_modules of the run's stored adapter_config.json (checked against its sha256)."""
    try:
        data = artifact_file(run_id=run.id, kind=ArtifactKind.ADAPTER, name="adapter_config.json")
        targets = json.loads(data)["target_modules"] if data is not None else None
    except (ArtifactDamaged, ValueError, KeyError, TypeError):
        return None
    return targets if isinstance(targets, list) else None


def _method_section(run: Run) -> list[str]:
    merges = "yes" if mergeable(run.method) else "no"
    rows = [(key, value) for key, value in _method_config(run).items()]
    if whole_model(run.method):
        what = "every weight trained; saved as a whole model, nothing to merge."
    else:
        what = f"mergeable into the base weights: {merges}."
    return [
        "## Method",
        "",
        f"{_md(method_title(run.method))} (`{_md(run.method)}`), {what}",
        "",
        *_table(("Setting", "Value"), rows),
    ]


def _training_section(run: Run) -> list[str]:
    if run.external and not run.train_config:
        return ["## Training", "", "Trained elsewhere; uploaded, checked and evaluated here."]
    if run.external:
        rows = flat_settings(run.train_config)
        intro = "Trained elsewhere; the settings its script reported:"
        return ["## Training", "", intro, "", *_table(("Setting", "Value"), rows)]
    try:
        config = dataclasses.asdict(TrainConfig(**run.train_config))
    except (TypeError, ValueError):
        config = dict(run.train_config)
    lines = ["## Training", "", *_table(("Setting", "Value"), list(config.items()))]
    wall_s = run.profile.get("wall_s")
    if wall_s:
        lines += ["", f"{run.step} steps in {wall_s:.1f} s (attempt {run.attempt})."]
    return lines


def _dataset_section(run: Run) -> list[str]:
    dataset = run.dataset
    if dataset is None:
        return ["## Dataset", "", "Trained elsewhere; it named no PEFT Lab dataset."]
    rows = [("Name", dataset.name), ("Task", dataset.task), ("Rows", dataset.row_count)]
    if dataset.is_builtin:
        rows.append(("Origin", "built-in sample generated by PEFT Lab's code (peft_core.samples)"))
    else:
        rows.append(("sha256 of the uploaded file", dataset.sha256 or "unknown"))
    if dataset.label_names:
        rows.append(("Labels (by class id)", ", ".join(map(str, dataset.label_names))))
    return ["## Dataset", "", *_table(("", ""), rows)]


def _results_section(run: Run) -> list[str]:
    summary, profile = run.summary or {}, run.profile or {}
    lines = ["## Results", ""]
    keys = [key for key in summary if not key.startswith("base_")]
    if keys:
        rows = [(key, _number(summary.get(f"base_{key}")), _number(summary[key])) for key in keys]
        lines += [*_table(("Metric (validation split)", "Base model", "With adapter"), rows), ""]
    if profile.get("trainable_params") is not None:
        lines += _table(("", ""), _profile_rows(profile))
    return lines if len(lines) > 2 else []


def _profile_rows(profile: dict[str, Any]) -> list[tuple[str, str]]:
    trainable, total = profile["trainable_params"], profile.get("total_params") or 0
    share = f" ({100 * trainable / total:.3f} % of {total:,})" if total else ""
    rows = [("Trainable parameters", f"{trainable:,}{share}")]
    if profile.get("adapter_bytes") is not None:
        size = profile["adapter_bytes"]
        rows.append(("Adapter size", f"{size:,} bytes ({size / 2**20:.3f} MiB)"))
    if profile.get("base_ms") and profile.get("adapter_ms"):
        latency = f"base {profile['base_ms']:.1f} ms, adapter {profile['adapter_ms']:.1f} ms"
        if profile.get("merged_ms"):
            latency += f", merged {profile['merged_ms']:.1f} ms"
        rows.append(("Inference latency", latency))
    return rows


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "—" if value is None else str(value)


def _usage_section(run: Run, merged: bool) -> list[str]:
    task = run_task(run)
    auto = AUTO_CLASSES.get(task, "AutoModelForCausalLM")
    if merged or whole_model(run.method):
        kind = "merged" if merged else "adapter"  # the download's folder name
        folder = f"peftlab-run-{run.id}-{kind}"
        code = [
            f"from transformers import {auto}, AutoTokenizer",
            "",
            f'model = {auto}.from_pretrained("{folder}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
        ]
        intro = "The adapter is folded into the weights: load it as a plain model, no PEFT."
        if not merged:
            intro = "Every weight was trained: load it as a plain model, no PEFT."
        return ["## How to use", "", intro, "", "```python", *code, "```"]
    return ["## How to use", "", *_hf_peft_usage(run, auto), "", *_peft_core_usage(run)]


def _labels_argument(run: Run) -> str:
    """`, num_labels=N` for a classifier (N from its dataset; 2 when none says)."""
    if run_task(run) != TaskType.SEQ_CLS:
        return ""
    labels = len(run.dataset.label_names) if run.dataset else 0
    return f", num_labels={labels or 2}"


def _hf_peft_usage(run: Run, auto: str) -> list[str]:
    folder = f"peftlab-run-{run.id}-adapter"
    extra = _labels_argument(run)
    base = base_model_id(run.base_model)
    weights = registered_weights(run)
    if weights:
        where = _py(weights["location"])
        if weights.get("commit"):
            where += f", revision={_py(weights['commit'])}"
    elif run.base_model in HUB_IDS:
        where = _py(base)
    else:  # a catalogue model without a Hub twin: its local directory
        where = f"model_dir({_py(run.base_model)})"
    code = [
        "from peft import PeftModel",
        f"from transformers import {auto}",
        *(
            []
            if weights or run.base_model in HUB_IDS
            else ["from peft_core.catalogue import model_dir"]
        ),
        "",
        f"base = {auto}.from_pretrained({where}{extra})",
        f'model = PeftModel.from_pretrained(base, "{folder}")',
    ]
    if not weights and run.base_model in HUB_IDS:  # the same weights, converted by PEFT Lab
        offline = f"{auto}.from_pretrained(model_dir({_py(run.base_model)}){extra})"
        code += [
            "",
            "# Offline, from PEFT Lab's converted copy of the same weights:",
            "# from peft_core.catalogue import model_dir",
            f"# base = {offline}",
        ]
    return ["With Hugging Face PEFT (unzipped into `" + folder + "`):", "", "```python"] + [
        *code,
        "```",
    ]


def _peft_core_usage(run: Run) -> list[str]:
    folder = f"peftlab-run-{run.id}-adapter"
    task, labels = run_task(run), _labels_argument(run)
    code = [
        "import peft_core",
        "from peft_core.catalogue import load_model",
        "",
        f"model, tokenizer = load_model({_py(run.base_model)}, {_py(task)}{labels})",
        f'model = peft_core.load_adapter(model, "{folder}")',
    ]
    if mergeable(run.method):
        code.append("peft_core.merge(model)  # optional: the base model's inference cost")
    return ["With peft_core (PEFT Lab's library):", "", "```python", *code, "```"]


def _notes_section(run: Run) -> list[str]:
    lines = [line for line in run.notes.splitlines() if line.strip()]
    if not lines:
        return []
    # A leading "-", "+" or "=" would make a list item or a rule of the line: escape it too.
    quoted = (re.sub(r"^([-+=])", r"\\\1", _md(line)) for line in lines)
    return ["## Notes", "", *(f"> {line}  " for line in quoted)]


# ---- the merged model: built by a worker, stored as the run's `merged` artifacts ------------


def merged_export_request(*, run: Run, retry: bool = False) -> MergedExport:
    """The run's merged export, queued now unless one is ready or building (a second request
    waits for the first); a failed one is queued again only when `retry`, a ready one when
    the run's adapter has a newer version than the build saw (the result is a new version
    of the merged files; the old ones stay). Anyone who can read the run may ask: it only
    derives what the run already holds. ValidationError when the run has nothing to merge."""
    refusal = merged_export_refusal(run)
    if refusal:
        raise ValidationError(refusal)
    with transaction.atomic():
        export, created = MergedExport.objects.select_for_update().get_or_create(run=run)
        stale = timezone.now() - timedelta(seconds=settings.MERGED_EXPORT_STALE_S)
        failed = retry and export.status == ExportStatus.FAILED
        outdated = export.status == ExportStatus.READY and _adapter_newer(export)
        if created or failed or outdated or (export.is_busy and export.updated_at < stale):
            export.status, export.error = ExportStatus.QUEUED, ""
            export.requested_at = timezone.now()
            export.save(update_fields=["status", "error", "requested_at", "updated_at"])
            queue.enqueue_on_commit(queue.MERGED_EXPORT, export.id)
    return export


def _adapter_newer(export: MergedExport) -> bool:
    """Whether an adapter file was stored after this build was asked for. `requested_at` is
    when it was last queued, and the worker reads the adapter after that, so this errs only
    towards one build too many, never towards serving a merge of an old adapter as current."""
    adapter = Artifact.objects.filter(run_id=export.run_id, kind=ArtifactKind.ADAPTER)
    newest = adapter.aggregate(last=Max("created_at"))["last"]
    return newest is not None and newest > export.requested_at


def merged_files(run: Run, *, version: int | None = None) -> QuerySet[Artifact]:
    """The files of the run's merged model: its newest version unless `version`."""
    return version_files(
        Artifact.objects.filter(run=run, kind=ArtifactKind.MERGED), version=version
    )


def merged_export_refusal(run: Run) -> str:
    """Why this run has no merged model to build ("" when it has one)."""
    if whole_model(run.method):
        return (
            "A fully fine-tuned model is a whole model already, with no adapter to merge: "
            "download its files."
        )
    if not mergeable(run.method):
        return (
            f"{method_title(run.method)} adapters cannot be merged into the base model's "
            "weights; download the adapter instead."
        )
    if run.status != RunStatus.SUCCEEDED:
        return "This run has not succeeded: there is no trained adapter to merge."
    if not Artifact.objects.filter(run=run, kind=ArtifactKind.ADAPTER).exists():
        return "This run has no stored adapter to merge."
    if not run.base_weights and run.base_model not in CATALOGUE:
        return (
            f"{run.base_model} is not a model registered here, so there are no base weights "
            "to merge the adapter into; download the adapter instead."
        )
    if run.dataset_id is None:
        return (
            "This run was trained elsewhere and names no dataset, so the merged model's task "
            "and labels are unknown here; download the adapter instead."
        )
    return ""


def merged_export_claim(*, export_id: int) -> int | None:
    """Take a queued export for this worker: its new attempt number, or None (a duplicate)."""
    with transaction.atomic():
        claimed = MergedExport.objects.filter(id=export_id, status=ExportStatus.QUEUED).update(
            status=ExportStatus.MERGING, attempt=F("attempt") + 1, updated_at=timezone.now()
        )
        if claimed != 1:
            return None
        return MergedExport.objects.values_list("attempt", flat=True).get(id=export_id)


def _export_owned(export_id: int, attempt: int):
    return MergedExport.objects.filter(
        id=export_id, attempt=attempt, status__in=EXPORT_BUSY_STATUSES
    )


def merged_export_progress(*, export_id: int, attempt: int, status: str) -> bool:
    """Move a build on to `status`; False when another attempt has taken it over."""
    return bool(_export_owned(export_id, attempt).update(status=status, updated_at=timezone.now()))


def merged_export_store(*, export_id: int, attempt: int, stored: dict[str, Stored]) -> int | None:
    """Record files the worker put in the artifact store as the run's next `merged` version
    and mark the export ready, all or nothing: the new version's number, or None when another
    attempt has taken the build over. Earlier versions stay. Files no row came to name (a
    superseded attempt, a failed commit) are deleted from the store again."""
    try:
        with transaction.atomic():
            export = _export_owned(export_id, attempt).select_for_update().first()
            version = None if export is None else _merged_record(export, stored)
    except BaseException:
        store_delete(file.key for file in stored.values())
        raise
    if version is None:
        store_delete(file.key for file in stored.values())
    else:
        _merged_orphans_delete(export.run_id)
    return version


def _merged_orphans_delete(run_id: int) -> None:
    """Delete the run's merged files that no row names: uploads of a worker killed before it
    recorded them. Right after a build is recorded no other build of the run is uploading
    (a superseded one would find its record refused and delete its files anyway)."""
    named = Artifact.objects.filter(run_id=run_id, kind=ArtifactKind.MERGED)
    keys = set(named.values_list("key", flat=True))
    folder = store_folder(run_id=run_id, kind=ArtifactKind.MERGED)
    store_delete([key for key in store_walk(folder) if key not in keys])


def _merged_record(export: MergedExport, stored: dict[str, Stored]) -> int:
    version = next_version(run_id=export.run_id, kind=ArtifactKind.MERGED)
    for name, file in sorted(stored.items()):
        artifact_record(
            run_id=export.run_id, kind=ArtifactKind.MERGED, name=name, version=version, file=file
        )
    size = sum(file.size for file in stored.values())
    MergedExport.objects.filter(id=export.id).update(
        status=ExportStatus.READY, size=size, error="", updated_at=timezone.now()
    )
    return version


def merged_export_fail(*, export_id: int, attempt: int, error: str) -> None:
    _export_owned(export_id, attempt).update(
        status=ExportStatus.FAILED, error=error[:2000], updated_at=timezone.now()
    )
