"""Where a base model's files come from, checked before anything loads them.

Two sources besides the catalogue (catalogue.py):

  a local directory   in Hugging Face layout, lying under one of the roots an administrator
                      allows. `local_directory` resolves the path (symlinks followed) and
                      refuses one whose real place, or any file's inside it, leaves the roots.
  a Hub id@revision   `Qwen/Qwen2.5-0.5B@main` or `…@<commit sha>`, fetched by
                      `huggingface_hub.snapshot_download` into one shared HF cache. Offline
                      (HF_HUB_OFFLINE=1, or asked for) it resolves from that cache only; the
                      snapshot folder's name is the commit the revision resolved to.

`model_files` then reads what a directory holds without loading a weight: the config (a
model that needs its own code, `auto_map`, is refused: `trust_remote_code` is never set),
the safetensors files (pickle-only weights are refused: a .bin file can run code when
unpickled), the tokenizer, a chat template, the stored dtype, and a content hash of the
config and the weights' index (each safetensors header: tensor names, dtypes, shapes and
offsets) that says which weights a run used.

Torch-free: the web checks a path or a Hub id in the request that registers it, and answers
400 at once; a worker then inspects the model (inspect.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_FILE = "config.json"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# What a Hub snapshot fetches: configs, safetensors weights, tokenizer files. Never pickles.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,99}")
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header larger than this is not one
MAX_WALK_ENTRIES = 10_000


class ModelSourceError(ValueError):
    """A model that cannot be used, and why: shown to the user as it is."""


# ---------------------------------------------------------------- local directories


def local_directory(path: str, roots: Sequence[str | Path]) -> Path:
    """The real directory `path` names, when it and everything in it lie under one of `roots`.

    A relative path is taken under the first root ("my-qwen" is "<root>/my-qwen"). Nothing
    outside the roots is opened: not the path, not a symlink's target.
    """
    if not path or "\x00" in path:
        raise ModelSourceError("give the model's directory")
    allowed = [Path(root).resolve() for root in roots]
    if not allowed:
        raise ModelSourceError("no model roots are allowed here (PEFTLAB_MODEL_ROOTS is empty)")
    shown = ", ".join(str(root) for root in allowed)
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = allowed[0] / candidate
    lexical = Path(os.path.normpath(candidate))
    real = candidate.resolve()
    if not _under(lexical, allowed):
        raise ModelSourceError(f"{path} is outside the allowed model roots ({shown})")
    if not _under(real, allowed):
        raise ModelSourceError(
            f"{path} is a symlink to {real}, outside the allowed model roots ({shown})"
        )
    if not real.is_dir():
        raise ModelSourceError(f"{path} is not a directory under {shown}")
    _refuse_escaping_links(real, allowed, shown)
    return real


def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _refuse_escaping_links(directory: Path, roots: Sequence[Path], shown: str) -> None:
    """Every symlink inside `directory` must point under a root (an HF cache snapshot's files
    are links to its blobs, in the same cache)."""
    seen = 0
    for current, dirs, files in os.walk(directory, followlinks=False):
        for name in (*dirs, *files):
            seen += 1
            if seen > MAX_WALK_ENTRIES:
                raise ModelSourceError(f"{directory} holds over {MAX_WALK_ENTRIES} files")
            entry = Path(current) / name
            if entry.is_symlink() and not _under(entry.resolve(), roots):
                inside = entry.relative_to(directory)
                raise ModelSourceError(
                    f"{inside} in {directory} links to {entry.resolve()}, outside the "
                    f"allowed model roots ({shown})"
                )


# ---------------------------------------------------------------- Hub ids


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str = "main"

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}"


def is_hub_ref(text: str) -> bool:
    """Whether `text` reads as a Hub id (org/name, optionally @revision) rather than a path."""
    repo_id = text.partition("@")[0]
    return bool(HUB_ID.fullmatch(repo_id)) and not text.startswith((".", "/", "~"))


def parse_hub_ref(text: str) -> HubRef:
    """ "org/name@rev" (rev defaults to main); refuses anything that is not one."""
    repo_id, _, revision = text.strip().partition("@")
    if not HUB_ID.fullmatch(repo_id) or ".." in repo_id:
        raise ModelSourceError(f"{text!r} is not a Hub id: expected org/name or org/name@revision")
    revision = revision or "main"
    if not REVISION.fullmatch(revision) or ".." in revision:
        raise ModelSourceError(f"{revision!r} is not a revision (a branch, tag or commit sha)")
    return HubRef(repo_id, revision)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read when asked (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(ref: HubRef, cache_dir: str | Path, *, offline: bool | None = None) -> Path:
    """The snapshot directory of `ref` in the HF cache at `cache_dir`, fetched there unless
    offline; its name is the commit sha the revision resolved to."""
    from huggingface_hub import snapshot_download

    offline = hub_offline() if offline is None else offline
    try:
        path = snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            cache_dir=str(cache_dir),
            local_files_only=offline,
            allow_patterns=list(HUB_PATTERNS),
        )
    except Exception as error:  # huggingface_hub raises a dozen kinds; each means "not here"
        raise ModelSourceError(_hub_missing(ref, cache_dir, offline, error)) from error
    return Path(path)


def _hub_missing(ref: HubRef, cache_dir: str | Path, offline: bool, error: Exception) -> str:
    repo_folder = "models--" + ref.repo_id.replace("/", "--")
    if offline:
        return (
            f"{ref} is not in the HF cache at {cache_dir}, and the Hub is off "
            f"(HF_HUB_OFFLINE=1). Put it there from a machine that reaches the Hub: "
            f"`HF_HUB_CACHE=<dir> hf download {ref.repo_id} --revision {ref.revision}`, then "
            f"copy <dir>/{repo_folder} into {cache_dir}."
        )
    return f"{ref} could not be fetched from the Hub into {cache_dir}: {type(error).__name__}"


def hub_commit(snapshot: Path) -> str:
    """The commit sha of a snapshot directory (…/snapshots/<sha>)."""
    return snapshot.name


# ---------------------------------------------------------------- what a directory holds


@dataclass(frozen=True)
class ModelFiles:
    directory: Path
    config: dict = field(repr=False)
    model_type: str
    architectures: tuple[str, ...]
    dtype: str  # as stored: "bfloat16", "float32", … ("" when neither config nor header says)
    weight_files: tuple[str, ...]
    weight_bytes: int
    has_chat_template: bool
    content_sha256: str


def model_files(directory: str | Path) -> ModelFiles:
    """What `directory` holds, read without loading a weight; refuses what PEFT Lab never loads."""
    directory = Path(directory)
    config = _read_config(directory)
    if "auto_map" in config:
        classes = (
            ", ".join(sorted(config["auto_map"])) if isinstance(config["auto_map"], dict) else ""
        )
        raise ModelSourceError(
            f"{directory.name} needs its own Python code (auto_map: {classes}); PEFT Lab never "
            "runs a model's code (trust_remote_code stays off). Use a model that transformers "
            "ships, or its port to transformers."
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelSourceError(f"{directory.name}/{CONFIG_FILE} names no model_type")
    weights = _weight_files(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelSourceError(
            f"{directory.name} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer beside the model (tokenizer.save_pretrained(dir))"
        )
    headers = [_safetensors_header(directory / name) for name in weights]
    architectures = config.get("architectures") or ()
    return ModelFiles(
        directory=directory,
        config=config,
        model_type=model_type,
        architectures=tuple(str(name) for name in architectures),
        dtype=_stored_dtype(config, headers),
        weight_files=weights,
        weight_bytes=sum((directory / name).stat().st_size for name in weights),
        has_chat_template=_has_chat_template(directory),
        content_sha256=_content_hash(directory, weights, headers),
    )


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ModelSourceError(f"{directory.name} has no {CONFIG_FILE}: not a Hugging Face model")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelSourceError(f"{directory.name}/{CONFIG_FILE} is not JSON: {error}") from error
    if not isinstance(config, dict):
        raise ModelSourceError(f"{directory.name}/{CONFIG_FILE} does not hold a JSON object")
    return config


def _weight_files(directory: Path) -> tuple[str, ...]:
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ModelSourceError(f"{WEIGHTS_INDEX} in {directory.name} is unreadable") from error
        missing = [name for name in names if not (directory / name).is_file() or "/" in name]
        if missing:
            raise ModelSourceError(f"{directory.name} lacks the weight shards {missing[:3]}")
        return tuple(names)
    names = sorted(p.name for p in directory.glob("*.safetensors") if p.is_file())
    if names:
        return tuple(names)
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelSourceError(
            f"{directory.name} has pickle weights only ({', '.join(pickles[:3])}): unpickling "
            "can run code, so PEFT Lab loads safetensors only. Convert once where you trust the "
            "file: AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise ModelSourceError(f"{directory.name} has no weights (*.safetensors)")


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file: every tensor's name, dtype, shape and offsets."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ModelSourceError(f"{path.name} is not a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ModelSourceError(f"{path.name} is not a safetensors file")
        header = handle.read(length)
    try:
        json.loads(header)
    except ValueError as error:
        raise ModelSourceError(f"{path.name} is not a safetensors file") from error
    return header


SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _stored_dtype(config: dict, headers: list[bytes]) -> str:
    declared = config.get("dtype") or config.get("torch_dtype")
    if isinstance(declared, str) and declared:
        return declared.removeprefix("torch.")
    for header in headers:
        for name, entry in json.loads(header).items():
            if name != "__metadata__" and entry.get("dtype") in SAFETENSORS_DTYPES:
                return SAFETENSORS_DTYPES[entry["dtype"]]
    return ""


def _has_chat_template(directory: Path) -> bool:
    if any((directory / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    try:
        tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(tokenizer_config, dict) and bool(tokenizer_config.get("chat_template"))


def _content_hash(directory: Path, weights: tuple[str, ...], headers: list[bytes]) -> str:
    """sha256 of config.json and, per weight file, its name, size and header."""
    digest = hashlib.sha256((directory / CONFIG_FILE).read_bytes())
    for name, header in zip(weights, headers, strict=True):
        size = (directory / name).stat().st_size
        digest.update(f"\n{name}\n{size}\n".encode())
        digest.update(header)
    return digest.hexdigest()
