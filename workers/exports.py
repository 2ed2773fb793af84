"""Merged exports, built on a worker of the `export` queue: never in a web request.

claim the export (a duplicate delivery finds it taken and exits) → load the base model,
fold the adapter into its weights (merging) → save a plain transformers directory with the
model card (writing) → store its files as the run's `merged` artifacts, ready. Each step is
written under the export's attempt number, so a build sent again after a stuck one wins.
"""

import logging
import shutil
import tempfile
import threading
from pathlib import Path

import peft_core
from peft_core.model import CONFIG_FILE, WEIGHTS_FILE, merge_and_unload
from webapp.experiments import artifacts, exports
from webapp.experiments.models import ArtifactKind, ExportStatus, MergedExport, Run
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
        exports.merged_export_progress(
            export_id=export_id, attempt=attempt, status=ExportStatus.WRITING
        )
        files = {path.name: path.read_bytes() for path in sorted(directory.iterdir())}
        stored = exports.merged_export_store(export_id=export_id, attempt=attempt, files=files)
        return "ready" if stored else "superseded"
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
        model, tokenizer = load_weights(weights, task, num_labels=len(labels) or 2)
        model = merge_and_unload(peft_core.load_adapter_files(model, _adapter_files(run)))
    except (KeyError, FileNotFoundError, ValueError) as exc:  # ModelSourceError is one
        raise ExportFailed(f"The merged model could not be built: {exc}") from exc
    if labels:
        model.config.id2label = dict(enumerate(map(str, labels)))
        model.config.label2id = {label: index for index, label in model.config.id2label.items()}
    model.config.name_or_path = exports.base_model_ref(run)  # not our cache path
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    card = exports.model_card(run, merged=True)
    (directory / exports.MODEL_CARD).write_text(card, encoding="utf-8")


def _adapter_files(run: Run) -> dict[str, bytes]:
    """The run's two adapter files, by their fixed names (never a stored name as a path)."""
    files = artifacts.artifact_files(run_id=run.id, kind=ArtifactKind.ADAPTER)
    if not {CONFIG_FILE, WEIGHTS_FILE} <= files.keys():
        raise ExportFailed("This run has no stored adapter to merge.")
    return {name: files[name] for name in (CONFIG_FILE, WEIGHTS_FILE)}
