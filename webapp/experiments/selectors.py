"""Reads of team data. Every query goes through a *_for_user selector, so another
team's id can only ever produce 404: existence does not leak."""

import json
from collections.abc import Iterator

from django.db.models import Count, Min, Q, QuerySet, Sum
from django.http import Http404
from django.utils import timezone

from peft_core.configs import EVAL_SECONDS
from webapp.accounts.models import Membership, Role, Team
from webapp.accounts.secrets import secret_digest
from webapp.experiments import run_search
from webapp.experiments.dataset_files import dataset_chunks, dataset_rows
from webapp.experiments.displayed_metrics import RUN_PAGE_KEYS
from webapp.experiments.downsample import DEFAULT_MAX_POINTS, json_values, series_downsampled
from webapp.experiments.models import (
    Artifact,
    Comment,
    Dataset,
    MetricPoint,
    PlaygroundPrompt,
    PlaygroundStatus,
    PlaygroundVote,
    Project,
    Run,
    RunListColumns,
    RunStatus,
    ShareLink,
    Sweep,
)


def team_list_for_user(*, user) -> QuerySet[Team]:
    return Team.objects.filter(memberships__user=user).order_by("name")


def project_list_for_user(*, user) -> QuerySet[Project]:
    return Project.objects.filter(team__memberships__user=user).select_related("team")


def project_list_for_launch(*, user) -> QuerySet[Project]:
    """Projects of the teams where the user's role may launch runs (not viewer)."""
    teams = Membership.objects.filter(user=user).exclude(role=Role.VIEWER).values("team_id")
    return Project.objects.filter(team_id__in=teams).select_related("team")


def project_get_for_user(*, user, project_id: int) -> Project:
    return _get_or_404(project_list_for_user(user=user), project_id)


def run_list_for_user(*, user) -> QuerySet[Run]:
    return Run.objects.filter(project__team__memberships__user=user).select_related(
        "project", "project__team", "dataset", "created_by"
    )


def run_get_for_user(*, user, run_id: int) -> Run:
    return _get_or_404(run_list_for_user(user=user), run_id)


def run_filter_for_user(
    *,
    user,
    method: str = "",
    base_model: str = "",
    dataset_id: int | None = None,
    status: str = "",
    tag: str = "",
    query: str = "",
    sweep_id: int | None = None,
    sort: str = "newest",
) -> QuerySet[Run]:
    """The user's runs through the list's filters, the query language of `q` and a sort
    (run_search.py); QueryError when the query or the sort cannot be read."""
    terms, order = run_search.parse_query(query), run_search.parse_sort(sort)
    runs = run_list_for_user(user=user)
    exact = {"method": method, "base_model": base_model, "dataset_id": dataset_id}
    exact |= {"status": status, "sweep_id": sweep_id, "tags__name": tag}
    runs = runs.filter(**{key: value for key, value in exact.items() if value})
    runs = run_search.runs_matching(runs, terms)
    # No DISTINCT: a user has one membership per team and a run one tag per name, so the
    # joins repeat no run (a DISTINCT over every selected column cost seconds at 10 000 runs).
    return run_search.runs_sorted(runs.prefetch_related("tags"), order)


DEFAULT_RUN_LIST_COLUMNS = ("eval_loss",)


def run_list_columns_for_user(*, user) -> list[str]:
    """The summary metrics the user's runs list shows as columns (eval_loss until they pick)."""
    saved = RunListColumns.objects.filter(user=user).values_list("keys", flat=True).first()
    return list(DEFAULT_RUN_LIST_COLUMNS if saved is None else saved)


def runs_by_ids_for_user(*, user, run_ids: list[int]) -> list[Run]:
    """The user's runs among `run_ids`, in the order given; others' ids are silently absent."""
    found = {run.id: run for run in run_list_for_user(user=user).filter(id__in=run_ids)}
    return [found[i] for i in run_ids if i in found]


def sweep_list_for_user(*, user) -> QuerySet[Sweep]:
    return Sweep.objects.filter(project__team__memberships__user=user).select_related(
        "project", "project__team", "dataset"
    )


def sweep_get_for_user(*, user, sweep_id: int) -> Sweep:
    return _get_or_404(sweep_list_for_user(user=user), sweep_id)


def dataset_list_for_user(*, user) -> QuerySet[Dataset]:
    """Built-in samples (no team) and the datasets of the user's teams."""
    return (
        Dataset.objects.filter(Q(team__isnull=True) | Q(team__memberships__user=user))
        .distinct()
        .order_by("team_id", "name")
    )


def dataset_get_for_user(*, user, dataset_id: int) -> Dataset:
    return _get_or_404(dataset_list_for_user(user=user), dataset_id)


def dataset_preview(*, dataset: Dataset, limit: int = 20) -> list[dict]:
    """The first rows (built-ins are previewed from their generator). An upload's file is read
    whole to check its sha256: DatasetDamaged when it fails."""
    if dataset.is_builtin:
        from peft_core.samples import sample_rows

        train, _ = sample_rows(dataset.builtin_key)
        return train[:limit]
    return dataset_rows(dataset, limit=limit)


def dataset_jsonl(*, dataset: Dataset) -> bytes:
    """Every row as JSON lines, in memory: `dataset_jsonl_chunks` joined."""
    return b"".join(dataset_jsonl_chunks(dataset=dataset))


def dataset_jsonl_chunks(*, dataset: Dataset) -> Iterator[bytes]:
    """Every row as JSON lines: an upload's stored file hashed as it streams (DatasetDamaged
    instead of its last chunk on a mismatch), a built-in from its generator."""
    if not dataset.is_builtin:
        return dataset_chunks(dataset)
    from peft_core.samples import sample_rows

    train, validation = sample_rows(dataset.builtin_key)
    lines = [json.dumps(row, ensure_ascii=False) for row in train + validation]
    return iter(["\n".join(lines).encode() + b"\n"])


def artifact_list_for_run(*, run: Run) -> QuerySet[Artifact]:
    return Artifact.objects.filter(run=run)


def artifact_versions(*, run: Run, kind: str) -> list[dict]:
    """The run's versions of one kind, newest first: {version, created_at, size, files}."""
    rows = (
        Artifact.objects.filter(run=run, kind=kind)
        .values("version")
        .annotate(created_at=Min("created_at"), size=Sum("size"), files=Count("id"))
        .order_by("-version")
    )
    return list(rows)


def metric_series(
    *, run: Run, keys: tuple[str, ...] = RUN_PAGE_KEYS, max_points: int = DEFAULT_MAX_POINTS
) -> dict[str, dict]:
    """{key: {"step": [...], "value": [...]}} by step, min/max-downsampled to ~max_points."""
    series = series_downsampled(run_ids=[run.id], keys=keys, max_points=max_points)
    return {
        key: {"step": steps.tolist(), "value": json_values(values)}
        for (_, key), (steps, values, _) in sorted(series.items())
    }


# No time left is told before this much training: the first steps are slow (warm-up, lazy
# allocations) and a pace read from two or three of them is a guess.
ETA_MIN_STEPS = 3
ETA_MIN_SECONDS = 5.0
ETA_WINDOW_S = 30.0  # the pace is that of the last half minute of training
ETA_POINTS = 200  # at most this many of the latest steps are read


def run_eta_seconds(*, run: Run) -> float | None:
    """Seconds left: the steps at the recent pace of training, plus the evaluations still
    ahead and the measurement after the last step; None while there is no pace to trust yet
    (fewer than ETA_MIN_STEPS steps or ETA_MIN_SECONDS of training in this attempt).

    The pace is read from the `train_s` each reported step carries (seconds of optimizer
    steps since this attempt's training began, evaluations left out) over the last
    ETA_WINDOW_S, from the end of a step on: the first step's warm-up never counts, the next
    slow ones stop counting as training moves on, and a resumed run's earlier attempt never
    counts. Each evaluation ahead (every eval_every steps, and one at the end) takes as long
    as the run's latest (`time/eval_s`); the measurement as long as the team's latest run of
    the same base model took. A run reported before steps carried train_s is paced by its
    `elapsed`, evaluations inside."""
    if run.status != RunStatus.RUNNING:
        return None
    paced_by = "train_s" if _has_points(run, "train_s") else "elapsed"
    attempt = _attempt_series(run, paced_by)
    if len(attempt) < ETA_MIN_STEPS or attempt[0][1] < ETA_MIN_SECONDS:
        return None
    last_step, last_s = attempt[0]
    start_step, start_s = next(
        (point for point in attempt if last_s - point[1] >= ETA_WINDOW_S), attempt[-1]
    )
    per_step = (last_s - start_s) / (last_step - start_step)
    left = per_step * (run.total_steps - run.step)
    if paced_by == "train_s":
        left += _evaluations_ahead(run) * _latest_value(run, EVAL_SECONDS)
        left += _measurement_seconds(run)
    return max(0.0, left)


def _has_points(run: Run, key: str) -> bool:
    return MetricPoint.objects.filter(run=run, key=key).exists()


def _latest_value(run: Run, key: str) -> float:
    point = MetricPoint.objects.filter(run=run, key=key).order_by("-step").first()
    return point.value if point is not None else 0.0


def _evaluations_ahead(run: Run) -> int:
    """Evaluations after the current step: every eval_every steps before the last, and the
    one at the end."""
    every = int(run.train_config.get("eval_every") or 0)
    between = ((run.total_steps - 1) // every - run.step // every) if every else 0
    return max(0, between) + 1


def _measurement_seconds(run: Run) -> float:
    """How long the measurement after training took for the team's latest finished run of
    the same base model and measurement (0 when there is none yet)."""
    measure = run.train_config.get("measure", "quick")
    latest = (
        Run.objects.filter(
            project__team_id=run.project.team_id,
            base_model=run.base_model,
            status=RunStatus.SUCCEEDED,
            external=False,
            profile__measure=measure,
        )
        .exclude(id=run.id)
        .order_by("-finished_at")
        .values_list("profile__measure_s", flat=True)
        .first()
    )
    return float(latest or 0.0)


def _attempt_series(run: Run, key: str) -> list[tuple[int, float]]:
    """(step, seconds) of the latest reported steps, newest first, of this attempt only: an
    earlier attempt's clock ran from another start, so going back it stops decreasing."""
    latest = MetricPoint.objects.filter(run=run, key=key).order_by("-step")
    attempt: list[tuple[int, float]] = []
    for step, seconds in latest.values_list("step", "value")[:ETA_POINTS]:
        if attempt and seconds >= attempt[-1][1]:
            break
        attempt.append((step, seconds))
    return attempt


def artifact_list_for_user(*, user) -> QuerySet[Artifact]:
    return Artifact.objects.filter(run__project__team__memberships__user=user).select_related("run")


def artifact_get_for_user(*, user, artifact_id: int) -> Artifact:
    return _get_or_404(artifact_list_for_user(user=user), artifact_id)


def comment_list_for_run(*, run: Run) -> QuerySet[Comment]:
    return Comment.objects.filter(run=run).select_related("author")


def comment_get_for_user(*, user, comment_id: int) -> Comment:
    comments = Comment.objects.filter(run__project__team__memberships__user=user)
    return _get_or_404(comments.select_related("run__project__team"), comment_id)


def share_link_list_for_user(*, user) -> QuerySet[ShareLink]:
    return ShareLink.objects.filter(team__memberships__user=user).select_related(
        "team", "run", "created_by"
    )


def share_link_get_for_user(*, user, link_id: int) -> ShareLink:
    return _get_or_404(share_link_list_for_user(user=user), link_id)


def share_link_resolve(*, secret: str) -> ShareLink:
    """The live link with this secret; unknown, revoked and expired links are all 404."""
    now = timezone.now()
    link = (
        ShareLink.objects.select_related("team", "run", "run__project", "run__dataset")
        .filter(digest=secret_digest(secret[:100]), revoked_at__isnull=True, expires_at__gt=now)
        .first()
    )
    if link is None:
        raise Http404("Not found")
    if link.last_used_at is None or (now - link.last_used_at).total_seconds() > 60:
        ShareLink.objects.filter(id=link.id).update(last_used_at=now)
    return link


def share_link_runs(*, link: ShareLink) -> list[Run]:
    """The runs a link shows, only those still in the link's team, in the link's order."""
    ids = [link.run_id] if link.run_id else list(link.run_ids)
    runs = Run.objects.filter(id__in=ids, project__team=link.team).select_related(
        "project", "project__team", "dataset", "created_by"
    )
    found = {run.id: run for run in runs}
    return [found[i] for i in ids if i in found]


def _get_or_404(queryset: QuerySet, pk: int):
    obj = queryset.filter(pk=pk).first()
    if obj is None:
        raise Http404("Not found")
    return obj


# ---- playground -----------------------------------------------------------------------------


def playground_prompt_list_for_user(*, user) -> QuerySet[PlaygroundPrompt]:
    return PlaygroundPrompt.objects.filter(team__memberships__user=user).select_related(
        "created_by", "team"
    )


def playground_prompt_get_for_user(*, user, prompt_id: int) -> PlaygroundPrompt:
    return _get_or_404(playground_prompt_list_for_user(user=user), prompt_id)


def playground_tally(*, runs) -> dict[int, dict[str, int]]:
    """Per run: the playground prompts it answered and the votes its answer won."""
    run_ids = [run.id for run in runs]
    tally = {run_id: {"prompts": 0, "wins": 0} for run_id in run_ids}
    answered = PlaygroundPrompt.runs.through.objects.filter(
        run_id__in=run_ids, playgroundprompt__status=PlaygroundStatus.DONE
    )
    for row in answered.values("run_id").annotate(n=Count("id")):
        tally[row["run_id"]]["prompts"] = row["n"]
    wins = PlaygroundVote.objects.filter(run_id__in=run_ids).values("run_id")
    for row in wins.annotate(n=Count("id")):
        tally[row["run_id"]]["wins"] = row["n"]
    return tally
