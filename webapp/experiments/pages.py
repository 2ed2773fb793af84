"""What the run and compare pages show, for members and for share-link visitors alike: the
page-context builders and the download responses that `views` and `share_views` both serve.
"""

from csp.constants import UNSAFE_EVAL
from django.core.exceptions import ValidationError
from django.http import Http404, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django_htmx.http import HTMX_STOP_POLLING

from peft_core.catalogue import CATALOGUE
from peft_core.configs import TrainConfig
from peft_core.registry import METHOD_CONFIGS
from peft_core.task_metrics import GENERATION_METRICS
from webapp.accounts.permissions import Action, can
from webapp.experiments import comparison, configurations, exports, selectors
from webapp.experiments.artifacts import (
    ArtifactDamaged,
    artifact_check,
    artifact_verify,
    latest_version,
    version_files,
)
from webapp.experiments.colors import run_color
from webapp.experiments.displayed_metrics import (
    SYSTEM_CHARTS,
    displayed,
    task_label,
    task_metric_rows,
)
from webapp.experiments.downloads import VERIFY_FIRST_BYTES
from webapp.experiments.lineage import lineage_items
from webapp.experiments.models import (
    Artifact,
    ArtifactHome,
    ArtifactKind,
    ExportStatus,
    MergedExport,
    RunStatus,
)
from webapp.experiments.services import PLAYGROUND_MAX_RUNS
from webapp.experiments.zipstream import stream_zip
from webapp.http import error_text

# The compare page's parallel-coordinates chart is WebGL: plotly.js draws it with regl, which
# compiles its shaders with Function(). The plotly package ships no eval-free ("strict") build,
# so the pages that show it, and only they, allow eval (settings.CONTENT_SECURITY_POLICY).
PLOTLY_WEBGL_CSP = {"script-src": [UNSAFE_EVAL]}

# The merged export's steps, as the progress bar shows them.
EXPORT_STEPS = (ExportStatus.QUEUED, ExportStatus.MERGING, ExportStatus.WRITING, ExportStatus.READY)


def run_page_context(run, *, urls: dict[str, str]) -> dict:
    """The run page's context; `urls` names its live partial, downloads and merged export
    routes (a member's or a share link's)."""
    adapter = list(_newest(run, ArtifactKind.ADAPTER))
    damaged = damaged_files(run, adapter) if run.is_finished else []
    return urls | {
        "run": run,
        "series": selectors.metric_series(run=run),
        "eta_seconds": selectors.run_eta_seconds(run=run),
        "artifacts": adapter,
        "adapter_damaged": any(a.damaged for a in adapter),
        "damaged": damaged,
        "versions": selectors.artifact_versions(run=run, kind=ArtifactKind.ADAPTER),
        "model_spec": CATALOGUE.get(run.base_model),
        "merged": merged_context(run),
        "displayed_metrics": displayed(run_page=True),
        "task_metrics": task_metric_rows(run.summary),
        "evaluation": evaluation_note(run),
        "system_charts": SYSTEM_CHARTS,
        "lineage": lineage_items(run.lineage),
        "method_title": exports.method_title(run.method),
        "known_method": run.method in METHOD_CONFIGS,
        **_settings_shown(run),
        "files": list(_newest_files(run)) if run.external else [],
    }


def evaluation_note(run) -> dict | None:
    """What a run launched here evaluates on: its dataset's validation rows, of which the
    first eval_batches × batch_size are read (loss and task metrics alike)."""
    if run.external or not run.dataset_id:
        return None
    try:
        config = TrainConfig(**run.train_config)
    except (TypeError, ValueError):
        return None
    rows = run.dataset.split_sizes[1]
    return {
        "rows": rows,
        "read": min(rows, config.eval_batches * config.batch_size),
        "metrics": [task_label(name) for name in config.eval_metrics],
        "generates": any(name in GENERATION_METRICS for name in config.eval_metrics),
        "new_tokens": config.max_new_tokens,
    }


# A run trained elsewhere may carry a whole TrainingArguments (100+ keys): the page lists
# this many settings and folds the rest away.
SETTINGS_SHOWN = 16


def _settings_shown(run) -> dict:
    settings = comparison.flat_settings(run.method_config) + comparison.flat_settings(
        run.train_config
    )
    return {"settings": settings[:SETTINGS_SHOWN], "more_settings": settings[SETTINGS_SHOWN:]}


def _newest_files(run):
    """The newest version of each file uploaded to a run trained elsewhere."""
    files = selectors.artifact_list_for_run(run=run).filter(kind=ArtifactKind.FILE)
    newest = {artifact.name: artifact for artifact in files.order_by("name", "version")}
    return sorted(newest.values(), key=lambda a: a.name)


def _newest(run, kind: str):
    return version_files(selectors.artifact_list_for_run(run=run).filter(kind=kind))


def damaged_files(run, adapter: list[Artifact]) -> list[Artifact]:
    """The run's files that fail a check, newest first. The adapter is checked now: whole
    when it is small database rows (its sha256 over a few MB), else that its store file is
    there with its size; every other file by what its last full read found."""
    small = sum(a.size for a in adapter) <= VERIFY_FIRST_BYTES
    for artifact in adapter:
        if small and artifact.home == ArtifactHome.DATABASE:
            artifact_verify(artifact)
        else:
            try:
                artifact_check(artifact)
            except ArtifactDamaged:
                pass  # recorded on the row
    checked = {a.id: a for a in adapter}
    recorded = selectors.artifact_list_for_run(run=run).exclude(damaged="")
    found = {a.id: a for a in recorded} | {i: a for i, a in checked.items() if a.damaged}
    return sorted(found.values(), key=lambda a: (a.kind, -a.version, a.name))


def requested_version(request) -> int | None:
    """?version=N of a download (None: the newest); Http404 for anything but a number."""
    raw = request.GET.get("version")
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or not 0 < int(raw) < 2**31:
        raise Http404("No such version.")
    return int(raw)


def merged_context(run) -> dict | None:
    """The merged-model panel: None where the run has nothing to merge (a method that does
    not merge, or a run trained elsewhere on a base, or for a task, PEFT Lab does not hold)."""
    if run.status != RunStatus.SUCCEEDED or exports.merged_export_refusal(run):
        return None
    export = MergedExport.objects.filter(run=run).first()
    status = export.status if export else ""
    step = EXPORT_STEPS.index(status) + 1 if status in EXPORT_STEPS else 0
    return {
        "export": export,
        "busy": bool(export and export.is_busy),
        "percent": round(100 * step / len(EXPORT_STEPS)),
        "version": latest_version(run_id=run.id, kind=ArtifactKind.MERGED) if export else None,
    }


def role_can(*, user, team) -> dict[str, bool]:
    """{action: allowed} for the template, so it offers only what the role may do."""
    return {action.value: can(user=user, team=team, action=action) for action in Action}


def _zip_response(stream, filename: str) -> StreamingHttpResponse:
    response = StreamingHttpResponse(stream, content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    response["X-Content-Type-Options"] = "nosniff"
    return response


def adapter_response(run, *, version: int | None = None, filename: str = ""):
    """The adapter's files (the newest version, or `version`) as one streamed zip (HF PEFT
    layout). A small adapter is checked whole first, so damage is a 409 with the reason; a
    big one streams hashed and damage cuts the transfer."""
    artifacts = adapter_files(run, version=version)
    if not artifacts:
        what = "no adapter yet" if version is None else f"no adapter version {version}"
        return HttpResponse(f"This run has {what}.", status=404, content_type="text/plain")
    problem = damage_before_sending(artifacts)
    if problem:
        return HttpResponse(problem, status=409, content_type="text/plain")
    return adapter_zip(run, artifacts, filename=filename)


def adapter_files(run, *, version: int | None = None) -> list[Artifact]:
    """The run's adapter files of one version (the newest when `version` is None)."""
    files = selectors.artifact_list_for_run(run=run).filter(kind=ArtifactKind.ADAPTER)
    return list(version_files(files, version=version))


def adapter_zip(run, artifacts: list[Artifact], *, filename: str = "") -> StreamingHttpResponse:
    """The files with the run's model card as a zip streamed hashed (damage_before_sending
    first: see adapter_response)."""
    card = {exports.MODEL_CARD: exports.model_card(run).encode()}
    when = run.finished_at or run.created_at
    stream = stream_zip(artifacts, extra=card, when=when)
    return _zip_response(stream, filename or f"peftlab-run-{run.id}-adapter.zip")


def damage_before_sending(artifacts: list[Artifact]) -> str:
    """Why the files must not be sent ("" when they may): a store file gone or resized, or
    (for files small enough to read twice) bytes that fail their sha256."""
    small = sum(a.size for a in artifacts) <= VERIFY_FIRST_BYTES
    for artifact in artifacts:
        problem = artifact_verify(artifact) if small else _check(artifact)
        if problem:
            return (
                f"{artifact.name} is damaged: its stored bytes no longer match what was "
                f"written, so it is not served ({problem})."
            )
    return ""


def _check(artifact: Artifact) -> str:
    try:
        artifact_check(artifact)
    except ArtifactDamaged as exc:
        return str(exc)
    return ""


def merged_response(run, *, page_url: str, version: int | None = None):
    """The merged model's zip once a worker has built it. Until then the build is asked for
    (once: a second request waits for the first) and the visitor goes back to the page,
    which shows its progress; a build that failed answers 409 with its reason. `version`
    names an earlier build, served as it is (404 when there is no such version)."""
    if version is not None:
        files = list(exports.merged_files(run, version=version))
        if not files:
            message = f"This run has no merged model version {version}."
            return HttpResponse(message, status=404, content_type="text/plain")
        return _merged_zip(run, files)
    try:
        export = exports.merged_export_request(run=run)
    except ValidationError as exc:
        return HttpResponse(error_text(exc), status=404, content_type="text/plain")
    if export.status == ExportStatus.FAILED:
        message = f"The merged model could not be built: {export.error}"
        return HttpResponse(message, status=409, content_type="text/plain")
    if export.status != ExportStatus.READY:
        return redirect(f"{page_url}#merged")
    return _merged_zip(run, list(exports.merged_files(run)))  # the newest version


def _merged_zip(run, files: list[Artifact]):
    problem = damage_before_sending(files)
    if problem:
        return HttpResponse(problem, status=409, content_type="text/plain")
    return _zip_response(stream_zip(files), f"peftlab-run-{run.id}-merged.zip")


def merged_build(request, run, context: dict, *, page_url: str):
    """POST: build (or, after a failure, rebuild) the merged model; htmx gets the panel."""
    try:
        exports.merged_export_request(run=run, retry=True)
    except ValidationError as exc:
        return HttpResponse(error_text(exc), status=404, content_type="text/plain")
    if not request.htmx:
        return redirect(f"{page_url}#merged")
    return merged_panel(request, context | {"merged": merged_context(run)})


def merged_panel(request, context: dict):
    """The polled merged-model panel; 286 stops the polling once the build is not busy."""
    response = render(request, "experiments/run_detail.html#merged", context)
    merged = context.get("merged")
    if not (merged and merged["busy"]):
        response.status_code = HTMX_STOP_POLLING
    return response


def compare_context(runs: list, *, metric: str | None = None) -> dict:
    """What the compare page shows, for members and for share-link visitors alike; `metric`
    is the quality metric asked for (the page's picker), else the preferred one."""
    columns, hparams, differing = comparison.hyperparameters(runs)
    found = configurations.tradeoffs(runs, metric=metric)
    payload = {
        "runs": [
            {
                "id": r.id,
                "name": r.name,
                "method": r.method,
                "status": r.status,
                "color": run_color(r.id),
            }
            for r in runs
        ],
        "curves": comparison.curves(runs),
        "hparams": hparams,
        "tradeoff": found.rows,  # one per configuration (a run, or its repeats over seeds)
        "metric": {"key": found.metric, "higher_is_better": found.higher_is_better},
    }
    charted = [r for r in found.rows if r["trainable_params"] and r["quality"] is not None]
    context = {
        "runs": runs,
        "payload": payload,
        "metric": found.metric,
        "metrics": found.metrics,
        "tradeoff_table": found.table(),
        "replicated": found.replicated,
        "recommendation": found.recommendation,
        "charted": bool(charted),
        "has_curves": bool(payload["curves"]),
        "columns": columns,
        "hparam_rows": [
            (run, [(row.get(c, "—"), c in differing) for c in columns])
            for run, row in zip(runs, hparams, strict=True)
        ],
        "differing": differing,
        "tradeoff": payload["tradeoff"],
        "displayed_metrics": displayed(compare=True),
        "lineage_rows": comparison.lineage_rows(runs),
    }
    tally = selectors.playground_tally(runs=runs)
    if any(t["prompts"] for t in tally.values()):
        context["playground_rows"] = [(run, tally[run.id]) for run in runs]
    # The playground needs each run's task, which only its dataset says.
    same_base = len({(r.base_model, r.dataset.task if r.dataset else None) for r in runs}) == 1
    succeeded = [r for r in runs if r.status == RunStatus.SUCCEEDED]
    if runs and same_base and runs[0].dataset and 0 < len(succeeded) <= PLAYGROUND_MAX_RUNS:
        context["playground_ids"] = ",".join(str(r.id) for r in succeeded)
    return context
