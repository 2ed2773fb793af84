"""Runs trained elsewhere, beyond their metric points (metrics.metrics_ingest): what a
free-form run may hold, the sizes its script reports, and the files it uploads.

- Its method and train configs are any JSON objects, bounded: CONFIG_MAX_BYTES serialised,
  CONFIG_MAX_DEPTH levels, string keys, finite numbers (`config_check`, the one judge the
  API's serializer and the services both ask).
- Its base model is any name; one that refers to a ready model of the team (by name, Hub id
  or directory: registry.selectors.model_by_reference) is linked as a launched run's is.
- Its profile holds what its script reports of PROFILE_KEYS, under the keys the workers
  write for launched runs, so the trade-off table, the compare page and the CSV read both
  alike (`profile_merge`).
- Files come to it while it runs or once it has finished: an adapter, checked in a separate
  process exactly as an uploaded adapter is (adapter_upload) and stored as the run's next
  adapter version; or any file up to settings.RUN_FILE_MAX_BYTES, streamed from Django's
  temporary file into the artifact store (write-once, sha256 recorded), never whole in memory.
"""

import json
import math
import re
import unicodedata

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Max
from django.template.defaultfilters import filesizeformat

from peft_core.catalogue import CATALOGUE
from webapp.accounts.permissions import Action, require
from webapp.experiments.adapter_upload import too_large_message, validate_adapter
from webapp.experiments.artifacts import artifact_put, artifact_record, next_version
from webapp.experiments.models import (
    EXTERNAL_WORKER,
    Artifact,
    ArtifactKind,
    Run,
    RunStatus,
)
from webapp.experiments.store import plain_name, store_delete, store_key, store_write
from webapp.registry.selectors import model_by_reference, upload_models

CONFIG_MAX_BYTES = 64 * 1024
CONFIG_MAX_DEPTH = 8
# What a script may report of its run's size, as launched runs' profiles name them.
PROFILE_KEYS = ("trainable_params", "total_params", "adapter_bytes")
PROFILE_MAX = 2**53 - 1  # an exact integer in any JSON reader
FILE_NAME_MAX_CHARS = 200
SHA256 = re.compile(r"[0-9a-f]{64}")


class RunBusy(ValidationError):
    """The run is not in a state that takes this now (the API answers 409)."""


class ProfileRefused(ValidationError):
    """Reported numbers that cannot be kept (the API answers 400 under "profile")."""


# ---- what a free-form run may hold ---------------------------------------------------------


def config_check(value, *, label: str) -> dict:
    """`value` if it is a JSON object within the bounds, else ValidationError naming the bound."""
    if not isinstance(value, dict):
        raise ValidationError(f"{label} must be a JSON object.")
    problem = _json_problem(value, depth=1)
    if problem:
        raise ValidationError(f"{label}: {problem}.")
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    if size > CONFIG_MAX_BYTES:
        raise ValidationError(
            f"{label} is {size:,} bytes of JSON; at most {CONFIG_MAX_BYTES:,} are kept."
        )
    return value


def _json_problem(value, *, depth: int) -> str:
    if isinstance(value, dict | list) and depth > CONFIG_MAX_DEPTH:
        return f"nested deeper than {CONFIG_MAX_DEPTH} levels"
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            return "keys must be strings"
        children = value.values()
    elif isinstance(value, list):
        children = value
    elif isinstance(value, float) and not math.isfinite(value):
        return "numbers must be finite"
    elif value is None or isinstance(value, str | int | float | bool):
        return ""
    else:
        return f"{type(value).__name__} is not a JSON value"
    return next((p for child in children if (p := _json_problem(child, depth=depth + 1))), "")


def base_model_link(*, team, name: str) -> tuple[str, dict]:
    """(the name the run records, its base_weights): a ready model of the team or a bundled
    one that `name` refers to is linked under its registry name; any other name is kept as
    it is, with no weights ({})."""
    model = model_by_reference(team=team, name=name)
    return (model.name, model.weights()) if model is not None else (name, {})


def total_steps(train_config: dict) -> int:
    """The steps a script says it will train: `steps`, else a positive `max_steps` (what
    transformers' TrainingArguments calls it); 0 when it says neither."""
    for key in ("steps", "max_steps"):
        value = train_config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, 2**31 - 1)
    return 0


def profile_merge(current: dict, reported: dict) -> dict:
    """`current` with the reported numbers in, and trainable_percent where both counts are
    known (as the workers compute it); ProfileRefused for any other key or value."""
    unknown = sorted(set(reported) - set(PROFILE_KEYS))
    if unknown:
        known = ", ".join(PROFILE_KEYS)
        raise ProfileRefused(f"profile takes {known}; not {', '.join(unknown)[:200]}.")
    for key, value in reported.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= PROFILE_MAX:
            raise ProfileRefused(f"profile.{key} must be an integer from 0 to {PROFILE_MAX:,}.")
    profile = {**current, **reported}
    trainable, total = profile.get("trainable_params"), profile.get("total_params")
    if trainable is not None and total is not None:
        if trainable > total:
            raise ProfileRefused(
                f"profile: trainable_params ({trainable:,}) cannot exceed total_params ({total:,})."
            )
        profile["trainable_percent"] = 100.0 * trainable / total if total else None
    return profile


# ---- files uploaded to a run ---------------------------------------------------------------


def _require_uploader(*, user, run: Run) -> None:
    """A member of the run's team (not a viewer), a run trained elsewhere, fed by the API,
    running or finished."""
    require(user=user, team=run.project.team, action=Action.LAUNCH)
    if not run.external:
        raise ValidationError(
            "Files are uploaded to runs trained elsewhere only; PEFT Lab's workers store "
            "this run's adapter themselves."
        )
    fed = run.status == RunStatus.RUNNING and run.worker == EXTERNAL_WORKER
    if not (fed or run.is_finished):
        raise RunBusy(f"The run is {run.status}: upload once a worker has finished with it.")


def run_adapter_upload(*, user, run: Run, config_file, weights_file) -> list[Artifact]:
    """The run's next adapter version from adapter_config.json and adapter_model.safetensors,
    checked against the run's base model in a separate process (adapter_upload) and stored
    as that check rebuilt them; the profile's adapter_bytes becomes what is stored, and its
    trainable_params the adapter's parameters unless the script reported them."""
    _require_uploader(user=user, run=run)
    # A base PEFT Lab holds: the adapter's shapes are held against it. Any other (a model
    # nobody registered here): its files are checked, the shapes cannot be, and the log
    # says so.
    linked = bool(run.base_weights) or run.base_model in CATALOGUE
    if weights_file.size > settings.ADAPTER_MAX_BYTES:  # before reading it into memory
        raise ValidationError(too_large_message("adapter_model.safetensors"))
    adapter = validate_adapter(
        config_file.read(),
        weights_file.read(),
        base_model=run.base_model,
        models=upload_models(team=run.project.team),
        structure_only=not linked,
    )
    files = {
        "adapter_config.json": adapter.config_bytes,
        "adapter_model.safetensors": adapter.weights_bytes,
    }
    with transaction.atomic():
        locked = Run.objects.select_for_update().get(id=run.id)  # one version at a time
        version = next_version(run_id=run.id, kind=ArtifactKind.ADAPTER)
        stored = [
            artifact_put(
                run_id=run.id, kind=ArtifactKind.ADAPTER, name=name, data=data, version=version
            )
            for name, data in files.items()
        ]
        reported = {"adapter_bytes": sum(a.size for a in stored)}
        total = locked.profile.get("total_params")
        if locked.profile.get("trainable_params") is None and adapter.parameters <= (
            PROFILE_MAX if total is None else total
        ):
            reported["trainable_params"] = adapter.parameters
        checked = (
            "checked against the base and re-serialised by PEFT Lab"
            if linked
            else f"re-serialised by PEFT Lab; {run.base_model} is not a model registered "
            "here, so its shapes were not checked against it"
        )
        line = (
            f"Adapter version {version} uploaded: {adapter.method} on {adapter.base_model}, "
            f"{adapter.tensors:,} tensors ({adapter.parameters:,} parameters), {checked}."
        )
        Run.objects.filter(id=run.id).update(
            profile=profile_merge(locked.profile, reported),
            log="\n".join(filter(None, [locked.log, line])),
        )
    return stored


def run_file_upload(*, user, run: Run, upload, name: str = "", sha256: str = "") -> Artifact:
    """Any file, as the run's next version of `name` (default: the upload's own name) of
    kind "file": streamed into the artifact store, its sha256 recorded; refused, with nothing
    kept, when it is over settings.RUN_FILE_MAX_BYTES or its sha256 is not the one sent."""
    _require_uploader(user=user, run=run)
    name = file_name_check(name or upload.name or "")
    expected = sha256.strip().lower()
    if expected and not SHA256.fullmatch(expected):
        raise ValidationError("sha256 must be 64 hexadecimal digits.")
    if upload.size > settings.RUN_FILE_MAX_BYTES:
        raise ValidationError(
            f"The file is larger than {filesizeformat(settings.RUN_FILE_MAX_BYTES)} "
            f"({settings.RUN_FILE_MAX_BYTES:,} bytes)."
        )
    upload.seek(0)
    key = store_key(run_id=run.id, kind=ArtifactKind.FILE, name=plain_name(name))
    stored = store_write(key, upload)
    try:
        if expected and stored.sha256 != expected:
            raise ValidationError(
                f"The file's sha256 is {stored.sha256}, not the {expected} sent: it changed on "
                "the way, so it was not kept. Send it again."
            )
        with transaction.atomic():
            Run.objects.select_for_update().filter(id=run.id).exists()  # one version at a time
            versions = Artifact.objects.filter(run=run, kind=ArtifactKind.FILE, name=name)
            version = (versions.aggregate(last=Max("version"))["last"] or 0) + 1
            return artifact_record(
                run_id=run.id, kind=ArtifactKind.FILE, name=name, version=version, file=stored
            )
    except BaseException:
        store_delete([stored.key])
        raise


def file_name_check(name: str) -> str:
    """`name` if it is a plain file name: 1 to FILE_NAME_MAX_CHARS printable characters, no
    path parts, no surrounding spaces; ValidationError otherwise (it is never changed into
    another name)."""
    if not name or len(name) > FILE_NAME_MAX_CHARS:
        raise ValidationError(f"A file name has 1 to {FILE_NAME_MAX_CHARS} characters.")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ValidationError("A file name has no path parts (no / or \\, not . or ..).")
    if name != name.strip() or any(unicodedata.category(c)[0] == "C" for c in name):
        raise ValidationError(
            "A file name has printable characters only, and no spaces at its ends."
        )
    return name
