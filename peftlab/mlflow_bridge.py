"""The MLflow bridge: `peftlab import mlflow` brings the runs of an MLflow tracking server or
store into PEFT Lab as runs trained elsewhere; `peftlab export mlflow` sends PEFT Lab runs
there. PEFT Lab is spoken to through its REST API (peftlab.client: no Django, no torch), MLflow
through its MlflowClient, from the optional extra `pip install 'peftlab[mlflow]'`
(mlflow-skinny), imported only when a bridge command runs.

What goes where, MLflow → PEFT Lab (export is the same map read backwards):

    run name (else its id)          name
    param base_model (or HF's       base_model ("unknown" when none says)
      model_name_or_path, ...)
    param method (or peft_type)     method ("unknown" when none says)
    params method_config.<path>     method_config, nested back ("r", "lora.alpha", ...)
    params train_config.<path>      train_config, nested back
    params profile.<key>            profile (trainable_params, total_params, adapter_bytes)
    other params                    train_config[<name>], numbers and booleans parsed
    tags (not mlflow.* system ones) tags "key=value" ("key" alone when empty); PEFT Lab's own
                                    list travels whole in the tag peftlab.tags
    metric histories                points: each (step, value); wall_time = seconds from the
                                    run's start; keys outside A-Z a-z 0-9 _ . / - get _ there
    each series' last point         summary
    status FINISHED/FAILED/KILLED   succeeded/failed/cancelled (RUNNING: left running)
    start and end times             train_config["mlflow_run"] (with the run id, experiment)
    a folder of artifacts holding   the run's adapter (checked by the server as any upload);
      adapter_config.json and         refused (e.g. for a base model it does not know), its
      adapter_model.safetensors       files are kept as the run's files instead
    other artifact files            the run's files, named by their path (/ → __)

Both directions are idempotent. An imported run carries the tag "mlflow:<run id>": found
again, a finished one is skipped, one left running (its MLflow run was still running) takes
the points logged since (the ingest keeps a point once per key and step) and is finished if
its MLflow run has ended. An exported run carries the tags peftlab.run_id and peftlab.server:
found in the experiment, it is skipped. Only finished runs are exported.
"""

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from peftlab.client import FINISHED_STATUSES, ApiError, Client, ClientError

IMPORT_TAG = "mlflow:"  # + the MLflow run id: how an imported run is found again
BASE_MODEL_PARAMS = ("base_model", "base_model_name_or_path", "model_name_or_path", "_name_or_path")
METHOD_PARAMS = ("method", "peft_type")
PREFIXED = ("method_config.", "train_config.", "profile.")
PROFILE_KEYS = ("trainable_params", "total_params", "adapter_bytes")
CONFIG_MAX_BYTES = 60_000  # under the 64 KiB of JSON a run's config may hold
TAG_VALUE_MAX_CHARS, TAGS_KEPT = 500, 50  # of the MLflow tags kept in train_config
STATUS_IN = {"FINISHED": "succeeded", "FAILED": "failed", "KILLED": "cancelled"}
STATUS_OUT = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
MAX_STEP = 2**31 - 1
MAX_TAGS, TAG_MAX_CHARS = 20, 50  # what a PEFT Lab run takes
SUMMARY_MAX_KEYS = 1000
ARTIFACT_MAX_FILES, ARTIFACT_MAX_DEPTH = 1000, 8
MLFLOW_BATCH = 1000  # metrics per log_batch: MLflow's own limit
PARAMS_BATCH = 100  # params per log_batch: MLflow's own limit
PARAM_MAX_CHARS = 6000  # MLflow's param value limit (older servers)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Outcome:
    """What happened to one run: a line for the terminal, and whether it went wrong."""

    source: str
    target: str = ""
    done: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: str = ""

    def line(self) -> str:
        if self.skipped:
            return f"{self.source}: skipped, {self.skipped}"
        what = f"{self.source} → {self.target}"
        parts = self.done + [f"problem: {p}" for p in self.problems]
        return f"{what} ({'; '.join(parts)})" if parts else what


# ---- MLflow, only when asked for ------------------------------------------------------------


def mlflow_client(tracking_uri: str):
    """An MlflowClient for the URI; ClientError saying what to install when MLflow is not there.
    A file store (a path or file://) is read and written although MLflow 3 keeps it in
    maintenance mode (it asks for MLFLOW_ALLOW_FILE_STORE=true; naming one here is asking)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ClientError(
            "the MLflow bridge needs MLflow's client: pip install 'peftlab[mlflow]'"
        ) from None
    if "://" not in tracking_uri or tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per run
    try:
        return MlflowClient(tracking_uri=tracking_uri)
    except ImportError as error:  # a database store without SQLAlchemy (mlflow-skinny)
        raise ClientError(
            f"{tracking_uri}: {error}. mlflow-skinny reads tracking servers (http://…) and "
            "file stores; a database store (sqlite://…) needs the full package: pip install mlflow"
        ) from None


def _experiment_ids(mlflow, name: str | None) -> list[str]:
    if name is None:
        return [e.experiment_id for e in mlflow.search_experiments()]
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        raise ClientError(f"no MLflow experiment named {name!r}")
    return [experiment.experiment_id]


def _mlflow_runs(mlflow, experiment_ids: list[str]) -> Iterator:
    token = None
    while True:
        page = mlflow.search_runs(
            experiment_ids, max_results=500, page_token=token, order_by=["attributes.start_time"]
        )
        yield from page
        token = page.token
        if not token:
            return


# ---- import: MLflow → PEFT Lab --------------------------------------------------------------


def import_runs(
    client: Client,
    tracking_uri: str,
    *,
    experiment: str | None = None,
    project: int | str | None = None,
    run_ids: Iterable[str] = (),
    artifacts: bool = True,
) -> list[Outcome]:
    """Bring the experiment's runs (every experiment's without one; only `run_ids` if given)."""
    from mlflow.exceptions import MlflowException

    mlflow = mlflow_client(tracking_uri)
    project_id = client.project_id(project)
    if run_ids:
        runs = [mlflow.get_run(run_id) for run_id in run_ids]
    else:
        runs = _mlflow_runs(mlflow, _experiment_ids(mlflow, experiment))
    names = {}
    outcomes = []
    for source in runs:
        experiment_id = source.info.experiment_id
        if experiment_id not in names:
            names[experiment_id] = mlflow.get_experiment(experiment_id).name
        outcome = Outcome(f"MLflow run {source.info.run_id}")
        try:
            _import_one(
                client, mlflow, source, names[experiment_id], project_id, artifacts, outcome
            )
        except (ApiError, MlflowException) as error:
            outcome.problems.append(str(error))
        outcomes.append(outcome)
    return outcomes


def _import_one(client, mlflow, source, experiment, project_id, artifacts, outcome) -> None:
    info = source.info
    existing = next(iter(client.runs(tag=IMPORT_TAG + info.run_id)), None)
    if existing is not None and existing["status"] in FINISHED_STATUSES:
        outcome.skipped = f"already imported as run #{existing['id']}"
        return
    if existing is None:
        existing = client.start_external_run(project=project_id, **_run_fields(source, experiment))
        outcome.done.append("created")
    else:
        outcome.done.append("was running: refreshed")
    run_id = existing["id"]
    outcome.target = f"run #{run_id}"
    summary = _send_points(client, mlflow, source, run_id, outcome)
    status = STATUS_IN.get(info.status)
    if status is None:
        outcome.done.append(f"left running: the MLflow run is {info.status}")
        return
    if artifacts:
        _import_artifacts(client, mlflow, info.run_id, run_id, outcome)
    profile = _profile(source.data.params)
    client.finish_run(run_id, status, summary=summary, profile=profile or None)
    outcome.done.append(status)


def _run_fields(source, experiment: str) -> dict:
    """The run's create body from an MLflow run (see the module's table)."""
    params, info = source.data.params, source.info
    method_config, train_config = {}, {}
    for name, raw in sorted(params.items()):
        if name.startswith("method_config."):
            _nest(method_config, name.removeprefix("method_config."), _value(raw))
        elif name.startswith("train_config."):
            _nest(train_config, name.removeprefix("train_config."), _value(raw))
        elif not name.startswith(PREFIXED) and name not in ("base_model", "method"):
            train_config.setdefault(name, _value(raw))
    user_tags = {
        key: value[:TAG_VALUE_MAX_CHARS]
        for key, value in sorted(source.data.tags.items())
        if not key.startswith(("mlflow.", "peftlab."))
    }
    user_tags = dict(list(user_tags.items())[:TAGS_KEPT])
    origin = {
        "run_id": info.run_id,
        "experiment": experiment,
        "start_time": _iso(info.start_time),
        "end_time": _iso(info.end_time),
        "tags": user_tags,
    }
    return {
        "name": (info.run_name or info.run_id)[:120],
        "base_model": _first(params, BASE_MODEL_PARAMS, "unknown")[:200],
        "method": _first(params, METHOD_PARAMS, "unknown").lower()[:60],
        "method_config": method_config,
        "train_config": _fitted(train_config, origin),
        "tags": _tags_in(source.data.tags, info.run_id),
    }


def _fitted(config: dict, origin: dict) -> dict:
    """config with origin under "mlflow_run", within CONFIG_MAX_BYTES of JSON: the largest
    entries are left out (named in origin["left_out"]) until it fits."""
    config, left_out = dict(config), []

    def size(value) -> int:
        return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())

    while (
        config and size(config | {"mlflow_run": origin | {"left_out": left_out}}) > CONFIG_MAX_BYTES
    ):
        largest = max(config, key=lambda key: size(config[key]))
        left_out.append(largest)
        del config[largest]
    return config | {"mlflow_run": origin | ({"left_out": left_out} if left_out else {})}


def _string_list(text: str) -> list[str]:
    """The strings of a JSON list (what an export wrote); nothing from anything else."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def _first(params: dict, names: tuple[str, ...], default: str) -> str:
    return next((params[n] for n in names if params.get(n)), default)


def _tags_in(tags: dict, run_id: str) -> list[str]:
    """PEFT Lab tags: the list an export wrote (peftlab.tags), else each user tag as
    "key=value", as many as fit; the import tag first."""
    names = [IMPORT_TAG + run_id]
    if "peftlab.tags" in tags:
        wanted = _string_list(tags["peftlab.tags"])
    else:
        wanted = [
            k if v == "" else f"{k}={v}"
            for k, v in sorted(tags.items())
            if not k.startswith(("mlflow.", "peftlab."))
        ]
    for name in wanted:
        fits = 0 < len(name) <= TAG_MAX_CHARS and len(names) < MAX_TAGS
        if fits and name not in names and not name.startswith(IMPORT_TAG):
            names.append(name)
    return names


def _send_points(client, mlflow, source, run_id: int, outcome: Outcome) -> dict:
    """Send every metric's history, one series at a time (memory holds one); returns the
    summary: each series' value at its last step, as the run's curves end. A series the
    server refuses (e.g. past the run's cap on distinct keys) stops the sending, named."""
    sent, dropped, summary = 0, 0, {}
    for key in sorted(source.data.metrics):
        history = mlflow.get_metric_history(source.info.run_id, key)
        points = _series(history, _metric_key(key), source.info.start_time or 0)
        dropped += len(history) - len(points)
        try:
            sent += client.ingest_metrics(run_id, points)
        except ApiError as error:
            outcome.problems.append(f"metric {key!r} and those after it not sent: {error}")
            break
        if points and len(summary) < SUMMARY_MAX_KEYS:
            summary[points[0]["key"]] = max(points, key=lambda p: p["step"])["value"]
    outcome.done.append(f"{sent:,} points")
    if dropped:
        outcome.done.append(f"{dropped:,} points left out (not finite, or a step outside 0…2³¹-1)")
    return summary


def _series(history, key: str, start_ms: int) -> list[dict]:
    """PEFT Lab's points of one MLflow metric history: finite values at steps it takes,
    wall_time in seconds from the run's start."""
    return [
        {
            "key": key,
            "step": m.step,
            "value": m.value,
            "wall_time": max(0.0, (m.timestamp - start_ms) / 1000),
        }
        for m in history
        if 0 <= m.step <= MAX_STEP and math.isfinite(m.value)
    ]


def _metric_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]", "_", key)[:64]


def _import_artifacts(client, mlflow, mlflow_id: str, run_id: int, outcome: Outcome) -> None:
    files = _artifact_files(mlflow, mlflow_id)
    adapter_dir = _adapter_folder(files)
    with tempfile.TemporaryDirectory(prefix="peftlab-mlflow-") as scratch:
        local = Path(scratch)
        for path in files:  # each to scratch/<its path> (MLflow writes a file by its name)
            folder = local / PurePosixPath(path).parent
            folder.mkdir(parents=True, exist_ok=True)
            mlflow.download_artifacts(mlflow_id, path, dst_path=str(folder))
        if adapter_dir is not None:
            try:
                client.upload_artifact(run_id, local / adapter_dir, kind="adapter")
                outcome.done.append(f"adapter from {adapter_dir or 'the artifacts root'}")
                files = [f for f in files if f not in _adapter_paths(adapter_dir)]
            except ClientError as error:  # refused by the server, or not one after all
                outcome.problems.append(f"adapter kept as files, not an adapter: {error}")
        sent = 0
        for path in files:
            try:
                client.upload_artifact(
                    run_id, local / path, kind="file", name=path.replace("/", "__")
                )
                sent += 1
            except ApiError as error:
                outcome.problems.append(f"{path}: {error}")
        if sent:
            outcome.done.append(f"{sent} files")


def _artifact_files(mlflow, run_id: str) -> list[str]:
    """The run's artifact file paths, breadth first, bounded."""
    files, folders = [], [("", 0)]
    while folders and len(files) < ARTIFACT_MAX_FILES:
        folder, depth = folders.pop(0)
        for entry in mlflow.list_artifacts(run_id, folder or None):
            parts = PurePosixPath(entry.path).parts
            if entry.path.startswith("/") or ".." in parts or "\\" in entry.path:
                continue  # a listing that names a path outside the run's folder
            if entry.is_dir and depth < ARTIFACT_MAX_DEPTH:
                folders.append((entry.path, depth + 1))
            elif not entry.is_dir:
                files.append(entry.path)
    return files[:ARTIFACT_MAX_FILES]


def _adapter_folder(files: list[str]) -> str | None:
    """The shallowest folder holding both adapter files ("" for the root), or None."""
    folders = sorted({f.rpartition("/")[0] for f in files}, key=lambda f: (f.count("/"), f))
    present = set(files)
    return next((d for d in folders if all(p in present for p in _adapter_paths(d))), None)


def _adapter_paths(folder: str) -> list[str]:
    return [f"{folder}/{name}" if folder else name for name in ADAPTER_FILES]


def _value(raw: str):
    """A param's text as the JSON value it spells (a number, true, false, null, a list or an
    object), else the text itself."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(value, float) and not math.isfinite(value):
        return raw
    return value


def _profile(params: dict) -> dict:
    """The whole numbers of the params profile.<key>."""
    found = {
        k.removeprefix("profile."): _value(v) for k, v in params.items() if k.startswith("profile.")
    }
    return {
        key: value
        for key, value in found.items()
        if key in PROFILE_KEYS and isinstance(value, int) and not isinstance(value, bool)
    }


def _nest(target: dict, path: str, value) -> None:
    """target[a][b][c] = value for the path "a.b.c"; under the dotted name itself where a
    part is already a value, not a folder."""
    *parents, leaf = path.split(".")
    node = target
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            target[path] = value
            return
        node = child
    node[leaf] = value


def _iso(millis: int | None) -> str | None:
    return None if millis is None else datetime.fromtimestamp(millis / 1000, UTC).isoformat()


# ---- export: PEFT Lab → MLflow --------------------------------------------------------------


def export_runs(
    client: Client, tracking_uri: str, run_ids: Iterable[int], *, experiment: str = "PEFT Lab"
) -> list[Outcome]:
    """Send the finished runs to the MLflow experiment (created if it does not exist)."""
    from mlflow.exceptions import MlflowException

    mlflow = mlflow_client(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else mlflow.create_experiment(experiment)
    outcomes = []
    for run_id in run_ids:
        outcome = Outcome(f"run #{run_id}")
        try:
            _export_one(client, mlflow, experiment_id, run_id, outcome)
        except (ApiError, MlflowException) as error:
            outcome.problems.append(str(error))
        outcomes.append(outcome)
    return outcomes


def _export_one(client, mlflow, experiment_id: str, run_id: int, outcome: Outcome) -> None:
    from mlflow.entities import Metric, Param

    run = client.run(run_id)
    if run["status"] not in FINISHED_STATUSES:
        outcome.problems.append(f"it is {run['status']}: export it once it has finished")
        return
    ours = {"peftlab.run_id": str(run_id), "peftlab.server": client.url}
    query = f"tags.`peftlab.run_id` = '{run_id}'"  # an int: nothing to quote
    same = mlflow.search_runs([experiment_id], filter_string=query, max_results=100)
    already = [r for r in same if r.data.tags.get("peftlab.server") == client.url]
    if already:
        outcome.skipped = f"already exported as MLflow run {already[0].info.run_id}"
        return
    start = _millis(run.get("started_at") or run["created_at"])
    target = mlflow.create_run(
        experiment_id, start_time=start, tags=ours | _tags_out(run["tags"]), run_name=run["name"]
    )
    target_id = target.info.run_id
    outcome.target = f"MLflow run {target_id}"
    params = [Param(k, v) for k, v in _params_out(run).items()]
    for i in range(0, len(params), PARAMS_BATCH):
        mlflow.log_batch(target_id, params=params[i : i + PARAMS_BATCH])
    sent, keys, last_step = 0, set(), run.get("step") or 0
    for batch in _chunks(client.metric_points(run_id), MLFLOW_BATCH):
        metrics = [
            Metric(p["key"], p["value"], _timestamp(p["wall_time"], start), p["step"])
            for p in batch
        ]
        mlflow.log_batch(target_id, metrics=metrics)
        sent += len(metrics)
        keys.update(p["key"] for p in batch)
        last_step = max(last_step, *(p["step"] for p in batch))
    final = [
        Metric(k, float(v), start, last_step)
        for k, v in (run.get("summary") or {}).items()
        if k not in keys and _plain_number(v)
    ]
    if final:
        mlflow.log_batch(target_id, metrics=final)
    outcome.done.append(f"{sent:,} points" + (f", {len(final)} summary values" if final else ""))
    with tempfile.TemporaryDirectory(prefix="peftlab-mlflow-") as scratch:
        if client.download_adapter(run_id, scratch):
            mlflow.log_artifacts(target_id, scratch, artifact_path="adapter")
            outcome.done.append("adapter")
    end = _millis(run["finished_at"]) if run.get("finished_at") else None
    mlflow.set_terminated(target_id, status=STATUS_OUT[run["status"]], end_time=end)
    outcome.done.append(STATUS_OUT[run["status"]])


def _params_out(run: dict) -> dict[str, str]:
    params = {"base_model": run["base_model"], "method": run["method"]}
    params |= _flat("method_config", run.get("method_config") or {})
    params |= _flat("train_config", run.get("train_config") or {})
    profile = run.get("profile") or {}
    params |= {f"profile.{k}": str(profile[k]) for k in PROFILE_KEYS if profile.get(k) is not None}
    return {k[:250]: v[:PARAM_MAX_CHARS] for k, v in params.items()}


def _flat(prefix: str, value) -> dict[str, str]:
    """Nested dicts as dotted names; any other value as its JSON text ("8", "true", "[1, 2]").
    A string is itself, unless it reads as another JSON value ("8"): then quoted, so an import
    gives back the string."""
    if isinstance(value, dict) and value:
        return {
            name: text
            for key, child in value.items()
            for name, text in _flat(f"{prefix}.{key}", child).items()
        }
    plain = isinstance(value, str) and _value(value) == value
    return {prefix: value if plain else json.dumps(value)}


def _tags_out(tags: list[str]) -> dict[str, str]:
    """Each tag as an MLflow tag ("key=value" split, a plain one with an empty value), and the
    whole list in peftlab.tags, which an import reads back as it was."""
    tags = [tag for tag in tags if not tag.startswith(IMPORT_TAG)]  # the source's, not ours
    out = {"peftlab.tags": json.dumps(tags)}
    for tag in tags:
        key, _, value = tag.partition("=")
        if re.fullmatch(r"[\w.\-/ :]{1,250}", key) and not key.startswith(("mlflow.", "peftlab.")):
            out.setdefault(key, value)
    return out


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _millis(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def _timestamp(wall_time: float, start_ms: int) -> int:
    """MLflow's milliseconds since the epoch: a worker's wall_time is already seconds since
    the epoch; a script's, seconds since its run's start."""
    return int(wall_time * 1000) if wall_time > 1e9 else start_ms + int(wall_time * 1000)


def _plain_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
