"""Merged exports, built on a worker of the `export` queue: never in a web request.

claim the export (a duplicate delivery finds it taken and exits) → load the base model in
its own dtype (bf16 stays bf16) and fold the adapter into its weights, ΔW in float32 and the
sum rounded once (merging) → save a plain transformers directory in safetensors shards of
settings.MERGED_SHARD_SIZE with the tokenizer and model card, stream each file into the
artifact store (writing) → record them as the run's next `merged` version, ready. Each step
is written under the export's attempt number, so a build sent again after a stuck one wins;
the loser's uploaded files are deleted.
"""

import logging
import shutil
import tempfile
import threading
from pathlib import Path

from django.conf import settings

import peft_core
from peft_core.model import CONFIG_FILE, WEIGHTS_FILE, merge_and_unload
from webapp.experiments import artifacts, exports
from webapp.experiments.models import ArtifactKind, ExportStatus, MergedExport, Run
from webapp.experiments.store import Stored, store_delete, store_key, store_write
from workers.models import load_weights, weights_of

logger = logging.getLogger(__name__)

# One merge at a time per process: each holds a whole base model in memory.
_merge_lock = threading.Lock()


class ExportFailed(Exception):
    """The merged model could not be built (base model missing, adapter refused)."""


def build_merged_export(export_id: int) -> str:
    attempt = exports.merged_export_claim(export_id=export_id)
    if attempt is None:
        return "skipped"
    run = MergedExport.objects.select_related("run__dataset", "run__project").get(id=export_id).run
    directory = Path(tempfile.mkdtemp(prefix="peftlab-merged-"))
    try:
        with _merge_lock:
            _save_merged(run, directory)
        if not exports.merged_export_progress(
            export_id=export_id, attempt=attempt, status=ExportStatus.WRITING
        ):
            return "superseded"  # another attempt builds it: upload nothing
        stored = _upload(run.id, directory)
        version = exports.merged_export_store(export_id=export_id, attempt=attempt, stored=stored)
        return "ready" if version else "superseded"
    except Exception as exc:
        logger.exception("merged export %s of run %s failed", export_id, run.id)
        error = str(exc) if isinstance(exc, ExportFailed) else f"{type(exc).__name__}: {exc}"
        exports.merged_export_fail(export_id=export_id, attempt=attempt, error=error)
        return "failed"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _save_merged(run: Run, directory: Path) -> None:
    """The base model with the run's adapter folded in, saved to `directory` with its card."""
    task, labels = run.dataset.task, list(run.dataset.label_names)
    try:
        weights = weights_of(run.base_model, run.base_weights)
        # dtype None: a registered model in its stored dtype, a bundled one in float32
        model, tokenizer = load_weights(weights, task, num_labels=len(labels) or 2)
        dtype = model.dtype
        model = merge_and_unload(peft_core.load_adapter_files(model, _adapter_files(run)))
    except (KeyError, FileNotFoundError, ValueError) as exc:  # ModelSourceError is one
        raise ExportFailed(f"The merged model could not be built: {exc}") from exc
    if labels:
        model.config.id2label = dict(enumerate(map(str, labels)))
        model.config.label2id = {label: index for index, label in model.config.id2label.items()}
    model.config.name_or_path = exports.base_model_ref(run)  # not our cache path
    # A trained head (modules_to_save) comes from the float32 adapter: one dtype throughout.
    model.to(dtype).save_pretrained(
        directory, safe_serialization=True, max_shard_size=settings.MERGED_SHARD_SIZE
    )
    tokenizer.save_pretrained(directory)
    card = exports.model_card(run, merged=True)
    (directory / exports.MODEL_CARD).write_text(card, encoding="utf-8")


def _adapter_files(run: Run) -> dict[str, bytes]:
    """The run's two adapter files, by their fixed names (never a stored name as a path)."""
    files = artifacts.artifact_files(run_id=run.id, kind=ArtifactKind.ADAPTER)
    if not {CONFIG_FILE, WEIGHTS_FILE} <= files.keys():
        raise ExportFailed("This run has no stored adapter to merge.")
    return {name: files[name] for name in (CONFIG_FILE, WEIGHTS_FILE)}


def _upload(run_id: int, directory: Path) -> dict[str, Stored]:
    """Stream each saved file into the artifact store (never whole in memory); on any
    failure the files already stored are deleted again."""
    stored: dict[str, Stored] = {}
    try:
        for path in sorted(directory.iterdir()):
            key = store_key(run_id=run_id, kind=ArtifactKind.MERGED, name=path.name)
            with path.open("rb") as handle:
                stored[path.name] = store_write(key, handle)
    except BaseException:
        store_delete(file.key for file in stored.values())
        raise
    return stored
