"""User-facing writes that span models: launches, cancels, notes, sharing, uploads, the
playground. Views, API classes and forms call these; they hold no logic of their own.

The fenced writes of a claimed run and the reaper's queries live in `leases`; metric
points in `metrics`; a run's stored files in `artifacts`. Work for a worker is named,
never imported: `queue.enqueue_on_commit`.
"""

import io
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files import File
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from peft_core.catalogue import CATALOGUE
from peft_core.checks import ConfigError
from peft_core.configs import eval_metric_names, refuse_eval_metrics
from peft_core.data import DatasetError
from webapp.accounts.models import Team
from webapp.accounts.permissions import Action, require
from webapp.accounts.secrets import secret_new
from webapp.accounts.services import audit_record
from webapp.experiments import external, queue, quotas
from webapp.experiments.adapter_upload import too_large_message, validate_adapter
from webapp.experiments.artifacts import artifact_put, artifacts_delete, checkpoints_delete
from webapp.experiments.dataset_files import dataset_file_delete, dataset_file_write
from webapp.experiments.method_forms import SweepItem
from webapp.experiments.models import (
    CLAIMABLE_STATUSES,
    EXTERNAL_WORKER,
    FINISHED_STATUSES,
    Artifact,
    ArtifactKind,
    Comment,
    Dataset,
    PlaygroundPrompt,
    PlaygroundStatus,
    PlaygroundVote,
    Project,
    Run,
    RunListColumns,
    RunStatus,
    ShareLink,
    ShareScope,
    Sweep,
    Tag,
)
from webapp.experiments.run_search import METRIC_KEY
from webapp.experiments.store import store_delete, store_delete_under, store_folder
from webapp.registry.selectors import model_for_team, upload_models


def _require_launcher(*, user, team: Team) -> None:
    require(user=user, team=team, action=Action.LAUNCH)


def run_create(
    *,
    user,
    project: Project,
    name: str,
    base_model: str,
    dataset: Dataset,
    method: str,
    method_config: dict,
    train_config: dict,
    devices: int = 1,
    gpu_class: str = queue.ANY_CLASS,
    priority: int = 0,
) -> Run:
    """Insert a queued run and enqueue its training once the transaction commits; a launch
    over a quota is QuotaExceeded, with nothing created."""
    _require_launcher(user=user, team=project.team)
    with transaction.atomic():
        quotas.launch_check(user=user, team=project.team, runs=1, devices=devices)
        return _run_insert(
            user=user,
            project=project,
            name=name,
            base_model=base_model,
            dataset=dataset,
            method=method,
            method_config=method_config,
            train_config=train_config,
            placement={"devices": devices, "gpu_class": gpu_class, "priority": priority},
        )


def _run_insert(
    *,
    user,
    project: Project,
    name: str,
    base_model: str,
    dataset: Dataset,
    method: str,
    method_config: dict,
    train_config: dict,
    placement: dict,
    sweep: Sweep | None = None,
) -> Run:
    run = Run.objects.create(
        project=project,
        sweep=sweep,
        name=name,
        created_by=user,
        base_model=base_model,
        base_weights=_base_weights(team=project.team, name=base_model),
        dataset=dataset,
        method=method,
        method_config=method_config,
        train_config=train_config,
        total_steps=int(train_config.get("steps", 0)),
        **placement,
    )
    queue.enqueue_run_on_commit(run)
    return run


def _base_weights(*, team: Team, name: str) -> dict:
    """What the run records of its base model: the registry row's source, commit and hash."""
    model = model_for_team(team=team, name=name)
    if model is None or not model.is_ready:
        raise ValidationError(f"{name} is not a ready model of {team.name}.")
    return model.weights()


def sweep_create(
    *,
    user,
    project: Project,
    name: str,
    base_model: str,
    dataset: Dataset,
    items: list[SweepItem],
    grid: dict,
    train_config: dict,
    seeds: int = 1,
    devices: int = 1,
    gpu_class: str = queue.ANY_CLASS,
    priority: int = 0,
) -> Sweep:
    """One Sweep row and one queued run per item, all enqueued once the transaction commits.
    The quotas judge the whole sweep first: over one, nothing is created. `seeds` is what
    the items were expanded with (each configuration's repeats are items already, and
    count as runs); the sweep keeps it to be cloned."""
    _require_launcher(user=user, team=project.team)
    placement = {"devices": devices, "gpu_class": gpu_class, "priority": priority}
    with transaction.atomic():
        quotas.launch_check(user=user, team=project.team, runs=len(items), devices=devices)
        sweep = Sweep.objects.create(
            project=project,
            name=name,
            created_by=user,
            base_model=base_model,
            dataset=dataset,
            grid={
                "methods": sorted({i.method for i in items}),
                "grid": grid,
                "train": train_config,
                "placement": placement,
                "seeds": seeds,
            },
        )
        for item in items:
            _run_insert(
                user=user,
                project=project,
                name=f"{name} · {item.label}"[:120],
                base_model=base_model,
                dataset=dataset,
                method=item.method,
                method_config=item.config,
                train_config=train_config | item.train,
                placement=placement,
                sweep=sweep,
            )
    return sweep


def run_cancel_request(*, user, run: Run) -> Run:
    """A queued run is cancelled at once; a running one is flagged and stops within one step."""
    _require_launcher(user=user, team=run.project.team)
    now = timezone.now()
    if Run.objects.filter(id=run.id, status__in=CLAIMABLE_STATUSES).update(
        status=RunStatus.CANCELLED, cancel_requested=True, finished_at=now, fence=F("fence") + 1
    ):
        checkpoints_delete(run_id=run.id)  # a lost run's checkpoints: it is never resumed now
    Run.objects.filter(id=run.id, status=RunStatus.RUNNING).update(cancel_requested=True)
    run.refresh_from_db()
    return run


TAG_MAX_CHARS = 50


def run_tag_add(*, user, run: Run, name: str) -> Tag:
    require(user=user, team=run.project.team, action=Action.ANNOTATE)
    name = name.strip()
    if not name or len(name) > TAG_MAX_CHARS:
        raise ValidationError(f"A tag has 1 to {TAG_MAX_CHARS} characters.")
    tag, _ = Tag.objects.get_or_create(run=run, name=name)
    return tag


def run_tag_remove(*, user, run: Run, name: str) -> None:
    require(user=user, team=run.project.team, action=Action.ANNOTATE)
    Tag.objects.filter(run=run, name=name).delete()


VAL_FRACTION_BOUNDS = (0.01, 0.5)


def dataset_upload_create(
    *,
    user,
    team: Team,
    name: str,
    filename: str,
    data: bytes | File,
    task: str,
    validation: tuple[str, bytes | File] | None = None,
    val_fraction: float = 0.1,
    eval_metrics: list[str] | tuple[str, ...] = (),
) -> Dataset:
    """Parse and validate an upload in one pass; raises ValidationError naming the line,
    storing nothing.

    `data` is the bytes or an uploaded file (Django spills a big one to a temporary file);
    the checked rows go to the artifact store as JSON lines (dataset_files). The client's file
    name is kept only as text to show (`original_name`), never used as a path.
    `validation` (file name, bytes or file) is the validation split, stored after the rows;
    without it, `val_fraction` of the rows are held out. `eval_metrics` are the task metrics
    its runs score by default, judged against the task and the columns.
    """
    _require_launcher(user=user, team=team)
    original_name = _upload_name(filename)
    fmt = _upload_format(original_name)
    low, high = VAL_FRACTION_BOUNDS
    if not low <= val_fraction <= high:
        raise ValidationError(f"The validation share must be {low} to {high}.")
    sizes = [data, *(validation[1:] if validation else ())]
    if sum(len(d) if isinstance(d, bytes) else d.size for d in sizes) > settings.DATASET_MAX_BYTES:
        raise ValidationError(f"The file is larger than {settings.DATASET_MAX_BYTES:,} bytes.")
    try:
        file = dataset_file_write(
            source=_readable(data),
            fmt=fmt,
            task=task,
            team_id=team.id,
            max_bytes=settings.DATASET_MAX_BYTES,
            max_rows=settings.DATASET_MAX_ROWS,
            validation=(
                (_readable(validation[1]), _upload_format(_upload_name(validation[0])))
                if validation
                else None
            ),
        )
    except DatasetError as exc:
        raise ValidationError(str(exc)) from None
    try:
        refuse_eval_metrics(eval_metrics, task=task, columns=file.columns)
    except ConfigError as exc:
        store_delete([file.stored.key])
        raise ValidationError(str(exc)) from None
    try:
        return Dataset.objects.create(
            team=team,
            name=name,
            task=task,
            original_name=original_name,
            file_format=fmt,
            file_key=file.stored.key,
            file_size=file.stored.size,
            file_sha256=file.stored.sha256,
            file_blocks=list(file.stored.blocks),
            columns=file.columns,
            label_names=file.label_names,
            row_count=file.row_count,
            sha256=file.upload_sha256,
            val_row_count=file.val_row_count,
            val_fraction=val_fraction,
            eval_metrics=list(eval_metric_names(eval_metrics)),
            created_by=user,
        )
    except BaseException:
        store_delete([file.stored.key])
        raise


def _readable(data: bytes | File):
    return io.BytesIO(data) if isinstance(data, bytes) else data


def _upload_name(filename: str) -> str:
    """The last path part of a client's file name, printable and at most 255 characters:
    text to show, never a path (`../../etc/passwd.csv` is kept as `passwd.csv`)."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    printable = "".join(char for char in base if char.isprintable())
    return " ".join(printable.split())[-255:]


def _upload_format(filename: str) -> str:
    lowered = filename.lower()
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise ValidationError("Upload a .csv or .jsonl file.")


# ---- notes, comments, deletion ------------------------------------------------------------

NOTES_MAX_CHARS = 20_000
COMMENT_MAX_CHARS = 5_000


def run_notes_update(*, user, run: Run, notes: str) -> Run:
    require(user=user, team=run.project.team, action=Action.ANNOTATE)
    if len(notes) > NOTES_MAX_CHARS:
        raise ValidationError(f"Notes hold at most {NOTES_MAX_CHARS:,} characters.")
    Run.objects.filter(id=run.id).update(notes=notes)
    run.notes = notes
    return run


def comment_create(*, user, run: Run, body: str) -> Comment:
    require(user=user, team=run.project.team, action=Action.ANNOTATE)
    body = body.strip()
    if not body or len(body) > COMMENT_MAX_CHARS:
        raise ValidationError(f"A comment has 1 to {COMMENT_MAX_CHARS:,} characters.")
    return Comment.objects.create(run=run, author=user, body=body)


def comment_delete(*, user, comment: Comment) -> None:
    """Authors delete their own comments; admins and owners delete any."""
    team = comment.run.project.team
    if comment.author_id == user.id:
        require(user=user, team=team, action=Action.ANNOTATE)
    else:
        require(user=user, team=team, action=Action.DELETE)
    comment.delete()


def run_delete(*, user, run: Run, ip: str | None = None) -> None:
    """Delete a finished run with its metrics and adapter; a live run must be cancelled first."""
    team = run.project.team
    require(user=user, team=team, action=Action.DELETE)
    target = f"run {run.id} “{run.name}”"
    with transaction.atomic():
        # Under the run's row lock: no claim (an UPDATE of the row) and no metric batch (it
        # locks the row too) can slip in between the check and the delete of its points.
        locked = Run.objects.select_for_update().filter(id=run.id).first()
        if locked is not None and not locked.is_finished:  # a lost run is sent again
            raise ValidationError(
                "Cancel the run first: a queued, running or lost run cannot be deleted."
            )
        _refuse_registered(Run.objects.filter(id=run.id))
        _run_files_delete([run.id])
        run.delete()
    audit_record(actor=user, team=team, action="run.delete", target=target, ip=ip)


def _refuse_registered(runs) -> None:
    """A run whose adapter is a version in the model registry keeps it: the version must be
    deleted first (the registry holds references to the run's files, not copies)."""
    run = runs.filter(registered_versions__isnull=False).order_by("id").first()
    if run is None:
        return
    versions = list(run.registered_versions.select_related("registered").order_by("id"))
    named = ", ".join(f"{v.registered.name} v{v.number}" for v in versions)
    raise ValidationError(
        f"Run {run.id}'s adapter is registered in the model registry ({named}): delete "
        f"{'that version' if len(versions) == 1 else 'those versions'} there first."
    )


def _run_files_delete(run_ids: list[int]) -> None:
    """The runs' artifact rows now and, once that commits, every file under their store
    folders: the rows' files and any that a killed worker uploaded but never recorded."""
    artifacts_delete(Artifact.objects.filter(run_id__in=run_ids))
    folders = [store_folder(run_id=i, kind=kind) for i in run_ids for kind in ArtifactKind.values]
    transaction.on_commit(lambda: [store_delete_under(f) for f in folders], robust=True)


def sweep_delete(*, user, sweep: Sweep, ip: str | None = None) -> int:
    """Delete a sweep and its runs; refused while any of them is unfinished (queued, running, lost)."""
    team = sweep.project.team
    require(user=user, team=team, action=Action.DELETE)
    target = f"sweep {sweep.id} “{sweep.name}”"
    with transaction.atomic():
        statuses = sweep.runs.select_for_update().order_by("id").values_list("status", flat=True)
        if any(status not in FINISHED_STATUSES for status in statuses):  # locked as run_delete
            raise ValidationError("Cancel the sweep's live runs first.")
        _refuse_registered(sweep.runs.all())
        _run_files_delete(list(sweep.runs.values_list("id", flat=True)))
        deleted, _ = sweep.runs.all().delete()
        sweep.delete()
    audit_record(actor=user, team=team, action="sweep.delete", target=target, ip=ip)
    return deleted


def dataset_delete(*, user, dataset: Dataset, ip: str | None = None) -> None:
    if dataset.team is None:
        raise ValidationError("Built-in datasets cannot be deleted.")
    require(user=user, team=dataset.team, action=Action.DELETE)
    if dataset.runs.exists() or dataset.sweeps.exists():
        raise ValidationError("Runs use this dataset; delete them first.")
    target = f"dataset {dataset.id} “{dataset.name}”"
    dataset.delete()
    dataset_file_delete(dataset.file_key)
    audit_record(actor=user, team=dataset.team, action="dataset.delete", target=target, ip=ip)


# ---- share links --------------------------------------------------------------------------

SHARE_LINK_PREFIX = "pls"


def share_link_create(
    *,
    user,
    team: Team,
    scope: str,
    run: Run | None = None,
    run_ids: list[int] | None = None,
    days: int = 30,
    ip: str | None = None,
) -> tuple[ShareLink, str]:
    """A read-only link and its secret (shown once). The caller has checked the runs' team."""
    require(user=user, team=team, action=Action.SHARE)
    if not 1 <= days <= settings.SHARE_LINK_MAX_DAYS:
        raise ValidationError(f"A link lives 1 to {settings.SHARE_LINK_MAX_DAYS} days.")
    if scope == ShareScope.RUN and (run is None or run.project.team_id != team.id):
        raise ValidationError("A run link needs one of the team's runs.")
    if scope == ShareScope.COMPARE and not run_ids:
        raise ValidationError("A comparison link needs at least one run.")
    plain, digest = secret_new(SHARE_LINK_PREFIX)
    link = ShareLink.objects.create(
        team=team,
        scope=scope,
        run=run if scope == ShareScope.RUN else None,
        run_ids=list(run_ids or []) if scope == ShareScope.COMPARE else [],
        digest=digest,
        created_by=user,
        expires_at=timezone.now() + timedelta(days=days),
    )
    detail = {"scope": scope, "days": days, "run": run.id if run else None, "runs": run_ids}
    audit_record(
        actor=user, team=team, action="share_link.create", target=str(link), detail=detail, ip=ip
    )
    return link, plain


def share_link_revoke(*, user, link: ShareLink, ip: str | None = None) -> None:
    """The link's creator (member or above) or an admin revokes it; it answers 404 from then on."""
    if link.created_by_id == user.id:
        require(user=user, team=link.team, action=Action.SHARE)
    else:
        require(user=user, team=link.team, action=Action.DELETE)
    if link.revoked_at is None:
        ShareLink.objects.filter(id=link.id).update(revoked_at=timezone.now())
        audit_record(
            actor=user, team=link.team, action="share_link.revoke", target=str(link), ip=ip
        )


# ---- runs trained elsewhere: created, fed and finished through the API ---------------------


def run_create_external(
    *,
    user,
    project: Project,
    name: str,
    base_model: str,
    method: str,
    method_config: dict,
    train_config: dict,
    dataset: Dataset | None = None,
    tags: list[str] | tuple[str, ...] = (),
    summary: dict | None = None,
    profile: dict | None = None,
) -> Run:
    """A run trained outside PEFT Lab: no worker takes it; the API feeds its metrics. Free
    form (external.py): any base model name (linked when it refers to a ready model of the
    team), any method name, any bounded config objects, a dataset or none."""
    team = project.team
    _require_launcher(user=user, team=team)
    external.config_check(method_config, label="method_config")
    external.config_check(train_config, label="train_config")
    if dataset is not None and dataset.team_id not in (None, team.id):
        raise ValidationError(f"The dataset is not one of {team.name}'s or a built-in one.")
    tags = _tag_names(tags)
    base_model, base_weights = external.base_model_link(team=team, name=base_model)
    with transaction.atomic():
        run = Run.objects.create(
            project=project,
            name=name,
            created_by=user,
            base_model=base_model,
            base_weights=base_weights,
            dataset=dataset,
            method=method,
            method_config=method_config,
            train_config=train_config,
            total_steps=external.total_steps(train_config),
            summary=summary or {},
            profile=external.profile_merge({}, profile or {}),
            external=True,
            status=RunStatus.RUNNING,
            worker=EXTERNAL_WORKER,
            started_at=timezone.now(),
        )
        Tag.objects.bulk_create(Tag(run=run, name=tag) for tag in tags)
    return run


MAX_CREATE_TAGS = 20


def _tag_names(names) -> list[str]:
    """Tags given with a new run, bounded as run_tag_add bounds one; duplicates once."""
    names = list(dict.fromkeys(name.strip() for name in names))
    if len(names) > MAX_CREATE_TAGS:
        raise ValidationError(f"A run takes at most {MAX_CREATE_TAGS} tags.")
    if any(not name or len(name) > TAG_MAX_CHARS for name in names):
        raise ValidationError(f"A tag has 1 to {TAG_MAX_CHARS} characters.")
    return names


def run_finish_external(
    *, user, run: Run, status: str, summary: dict | None = None, profile: dict | None = None
) -> Run:
    """End a run trained elsewhere; `summary` replaces its summary, `profile`'s numbers
    join what it reported before (external.profile_merge)."""
    _require_launcher(user=user, team=run.project.team)
    if not run.external:
        raise ValidationError("Only a run trained elsewhere is finished through the API.")
    if status not in FINISHED_STATUSES:
        raise ValidationError("Finish with succeeded, failed or cancelled.")
    with transaction.atomic():
        locked = Run.objects.select_for_update().filter(id=run.id).first()
        if locked is None or locked.status != RunStatus.RUNNING:
            raise ValidationError(f"The run is already {locked.status if locked else 'gone'}.")
        fields = {"status": status, "finished_at": timezone.now()}
        if summary is not None:
            fields["summary"] = summary
        if profile:
            fields["profile"] = external.profile_merge(locked.profile, profile)
        Run.objects.filter(id=run.id).update(**fields)
    run.refresh_from_db()
    return run


# ---- adapters trained elsewhere, uploaded as files -----------------------------------------

# A run needs a dataset; an uploaded adapter is attached to the built-in sample of its task
# unless the uploader picks one (the dataset an evaluation would use).
UPLOAD_DEFAULT_DATASETS = {"causal-lm": "sample-instructions", "seq-cls": "sample-sentiment"}


def adapter_upload_create(
    *,
    user,
    project: Project,
    name: str,
    base_model: str,
    config_file,
    weights_file,
    dataset: Dataset | None = None,
) -> Run:
    """An external run holding an uploaded adapter, queued for evaluation; ValidationError,
    storing nothing, when the files are refused. They are checked in a separate process
    (adapter_upload), and only what that check rebuilt is stored: peft_core's config and
    the re-serialised tensors."""
    _require_launcher(user=user, team=project.team)
    if weights_file.size > settings.ADAPTER_MAX_BYTES:  # before reading it into memory
        raise ValidationError(too_large_message("adapter_model.safetensors"))
    adapter = validate_adapter(
        config_file.read(),
        weights_file.read(),
        base_model=base_model,
        models=upload_models(team=project.team),
    )
    dataset = _upload_dataset(task=adapter.task, dataset=dataset)
    with transaction.atomic():
        run = Run.objects.create(
            project=project,
            name=name,
            created_by=user,
            base_model=adapter.base_model,
            base_weights=_base_weights(team=project.team, name=adapter.base_model),
            dataset=dataset,
            method=adapter.method,
            method_config=adapter.method_config,
            train_config={},
            external=True,
            log=f"Uploaded adapter: {adapter.method} on {adapter.base_model}, "
            f"{adapter.tensors:,} tensors ({adapter.parameters:,} parameters), "
            "checked and re-serialised by PEFT Lab; queued for evaluation on "
            f"{dataset.name}.",
        )
        artifact_put(
            run_id=run.id,
            kind=ArtifactKind.ADAPTER,
            name="adapter_config.json",
            data=adapter.config_bytes,
        )
        artifact_put(
            run_id=run.id,
            kind=ArtifactKind.ADAPTER,
            name="adapter_model.safetensors",
            data=adapter.weights_bytes,
        )
        # A worker measures it as it measures a trained run: base and adapter eval loss on
        # the dataset's validation split, latency, parameters.
        queue.enqueue_run_on_commit(run)
    return run


def _upload_dataset(*, task: str, dataset: Dataset | None) -> Dataset:
    if dataset is None:
        return Dataset.objects.get(team=None, builtin_key=UPLOAD_DEFAULT_DATASETS[task])
    if dataset.task != task:
        raise ValidationError(f"This adapter is for {task}; the dataset is {dataset.task}.")
    return dataset


# ---- playground -----------------------------------------------------------------------------

PLAYGROUND_MAX_RUNS = 4
PLAYGROUND_MAX_CHARS = 2000


def playground_prompt_create(*, user, runs: list[Run], text: str) -> PlaygroundPrompt:
    """Queue one prompt for the base model and up to PLAYGROUND_MAX_RUNS adapters of one team,
    one base model and one task; a worker answers it."""
    text = text.strip()
    if not text:
        raise ValidationError("Type a prompt (or a sentence to classify).")
    if len(text) > PLAYGROUND_MAX_CHARS:
        raise ValidationError(f"A prompt holds at most {PLAYGROUND_MAX_CHARS} characters.")
    if not 1 <= len(runs) <= PLAYGROUND_MAX_RUNS:
        raise ValidationError(f"Pick between 1 and {PLAYGROUND_MAX_RUNS} runs.")
    nameless = next((run for run in runs if run.dataset is None), None)
    if nameless is not None:
        raise ValidationError(
            f"“{nameless.name}” was trained elsewhere and names no dataset, so its task is "
            "unknown here: it cannot answer in the playground."
        )
    unheld = next(
        (
            run
            for run in runs
            if run.external and not run.base_weights and run.base_model not in CATALOGUE
        ),
        None,
    )
    if unheld is not None:
        raise ValidationError(
            f"“{unheld.name}” was trained elsewhere on {unheld.base_model}, which is not a "
            "model registered here: there is no base to load its adapter onto. Register the "
            "model (Models) to try such adapters."
        )
    teams = {run.project.team_id for run in runs}
    models_and_tasks = {(run.base_model, run.dataset.task) for run in runs}
    if len(teams) != 1:
        raise ValidationError("The runs must belong to one team.")
    if len(models_and_tasks) != 1:
        raise ValidationError("The runs must share one base model and task to answer side by side.")
    if any(run.status != RunStatus.SUCCEEDED for run in runs):
        raise ValidationError("Only finished, succeeded runs have an adapter to try.")
    team = runs[0].project.team
    require(user=user, team=team, action=Action.LAUNCH)
    base_model, task = models_and_tasks.pop()
    with transaction.atomic():
        prompt = PlaygroundPrompt.objects.create(
            team=team, created_by=user, base_model=base_model, task=task, text=text
        )
        prompt.runs.set(runs)
        queue.enqueue_on_commit(queue.PLAYGROUND_ANSWER, prompt.id)
    return prompt


def playground_claim(*, prompt_id: int) -> bool:
    """Take a queued prompt for this worker; False for a duplicate delivery."""
    claimed = PlaygroundPrompt.objects.filter(id=prompt_id, status=PlaygroundStatus.QUEUED)
    return claimed.update(status=PlaygroundStatus.RUNNING) == 1


def playground_finish(*, prompt_id: int, answers: dict | None = None, error: str = "") -> None:
    PlaygroundPrompt.objects.filter(id=prompt_id, status=PlaygroundStatus.RUNNING).update(
        status=PlaygroundStatus.FAILED if error else PlaygroundStatus.DONE,
        answers=answers or {},
        error=error[:2000],
        finished_at=timezone.now(),
    )


def playground_vote(*, user, prompt: PlaygroundPrompt, run: Run | None) -> PlaygroundVote:
    """Record (or change) this person's pick of the best answer: a run, or None for the base."""
    require(user=user, team=prompt.team, action=Action.ANNOTATE)
    if prompt.status != PlaygroundStatus.DONE:
        raise ValidationError("Vote once the answers are in.")
    if run is not None and not prompt.runs.filter(id=run.id).exists():
        raise ValidationError("That run did not answer this prompt.")
    vote, _ = PlaygroundVote.objects.update_or_create(
        prompt=prompt, user=user, defaults={"run": run}
    )
    return vote


# ---- the runs list's columns --------------------------------------------------------------

MAX_RUN_LIST_COLUMNS = 8


def run_list_columns_set(*, user, keys: list[str]) -> list[str]:
    """Save the summary metrics the user's runs list shows, in order, each once; a key that
    is no metric key (1-64 of A-Z a-z 0-9 _ . / -) or more than MAX_RUN_LIST_COLUMNS of them
    are refused and nothing changes."""
    keys = list(dict.fromkeys(key.strip() for key in keys))
    bad = [key for key in keys if not METRIC_KEY.match(key)]
    if bad:
        raise ValidationError(f"“{bad[0][:80]}” is not a metric key: 1-64 of A-Z a-z 0-9 _ . / -.")
    if len(keys) > MAX_RUN_LIST_COLUMNS:
        raise ValidationError(f"At most {MAX_RUN_LIST_COLUMNS} metric columns.")
    RunListColumns.objects.update_or_create(user=user, defaults={"keys": keys})
    return keys
