"""What a tracked run could not send, kept on disk until the server answers again.

One append-only JSON-lines file per run, under `spool_dir()`:

    {"spool": 1, "url": "http://127.0.0.1:8000", "run": 42}    the header (run null: not created yet)
    {"create": {"project": "Default", "run": {...}}}             the run, when started offline
    {"points": [{"key", "step", "value", "wall_time"}, …]}
    {"artifact": {"kind": "adapter", "path": "<name>.files/0"}}  a copy of what log_artifact had
    {"finish": {"status": "succeeded", "summary": {…}, "profile": {…}}}

Beside it, `<name>.sent` holds {"offset": bytes sent, "run": id}, replaced atomically after
each request, so a drain that stops anywhere (the server gone again, Ctrl-C) goes on from
the next record. Sending a record twice is harmless: the ingest keeps a point already stored
(run + key + step), and a finish the server already has is recognised. Once every record is
sent the files are removed. The running SDK holds an exclusive lock on its file, so
`peftlab sync` leaves it to that process.
"""

import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.client import INGEST_BATCH, RETRY_STATUSES, ApiError, Client

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a sync during a run only repeats sends
    fcntl = None

log = logging.getLogger(__name__)

VERSION = 1
SUFFIX = ".jsonl"


def spool_dir() -> Path:
    """$PEFTLAB_SPOOL_DIR, else $XDG_DATA_HOME/peftlab/spool (~/.local/share by default)."""
    if os.environ.get("PEFTLAB_SPOOL_DIR"):
        return Path(os.environ["PEFTLAB_SPOOL_DIR"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "peftlab" / "spool"


def spool_files(directory: Path | None = None) -> list[Path]:
    """The spool files waiting in directory, oldest first."""
    directory = directory or spool_dir()
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"*{SUFFIX}"), key=lambda path: path.stat().st_mtime)


class SpoolLocked(Exception):
    """Another process (the script still running) holds this spool file."""


class SpoolError(Exception):
    """A spool file that cannot be read (not ours, or damaged before its first record)."""


@dataclass
class Drained:
    """What one drain sent."""

    run: int | None = None
    points: int = 0
    artifacts: int = 0
    finished: str | None = None  # the status sent, if the finish was among the records
    skipped: list[str] = field(default_factory=list)  # records the server refused, and why


class Spool:
    """One run's spool file: `create` starts one, `open` takes an existing one (for sync)."""

    def __init__(self, path: Path, file) -> None:
        self.path = path
        self._file = file  # open for appending, locked
        header = _read_header(path)
        self.url: str = header["url"]
        self._state = self._read_state(header)

    @classmethod
    def create(cls, url: str, run_id: int | None, directory: Path | None = None) -> "Spool":
        directory = directory or spool_dir()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / f"run-{run_id or 'new'}-{secrets.token_hex(4)}{SUFFIX}"
        file = path.open("xb")
        _lock(file, blocking=True)
        header = {"spool": VERSION, "url": url, "run": run_id}
        file.write(json.dumps(header).encode() + b"\n")
        file.flush()
        return cls(path, file)

    @classmethod
    def open(cls, path: Path) -> "Spool":
        """An existing file; SpoolLocked if a running script still holds it."""
        file = path.open("ab")
        try:
            _lock(file, blocking=False)
        except BlockingIOError:
            file.close()
            raise SpoolLocked(f"{path.name} is held by a script that is still running") from None
        return cls(path, file)

    @property
    def run_id(self) -> int | None:
        return self._state.get("run")

    def close(self) -> None:
        self._file.close()  # releases the lock

    # --- writing ------------------------------------------------------------

    def append(self, record: dict) -> None:
        """One record, on disk before this returns (a crash right after keeps it)."""
        self._file.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def keep_artifact(self, kind: str, path: Path, name: str | None) -> None:
        """Copy an artifact beside the spool (the original may be a temporary directory) and
        record it."""
        files = self.path.with_suffix(".files")
        target = files / str(sum(1 for _ in files.iterdir()) if files.is_dir() else 0)
        if path.is_dir():
            shutil.copytree(path, target)
            relative = target
        else:
            target.mkdir(parents=True)
            relative = target / path.name
            shutil.copy2(path, relative)
        where = relative.relative_to(self.path.parent).as_posix()
        self.append({"artifact": {"kind": kind, "path": where, "name": name}})

    # --- sending ------------------------------------------------------------

    def drain(self, client: Client) -> Drained:
        """Send every record not sent yet, in order, then remove the files. ServerUnreachable,
        a 5xx, and 401/403 stop it where it is (the rest stays for the next drain); another
        refusal skips that one record, named in `skipped`."""
        done = Drained(run=self.run_id)
        for end, kind, value in self._pending():
            self._send(client, kind, value, done)
            self._state["offset"] = end
            self._save_state()
            done.run = self.run_id
        self.remove()
        return done

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.path.with_suffix(".files"), ignore_errors=True)
        self._state_path().unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)

    def _pending(self) -> Iterator[tuple[int, str, Any]]:
        """(end offset, kind, value) from the first record not sent; consecutive points
        records come as one list of up to INGEST_BATCH points."""
        points: list[dict] = []
        points_end = 0
        for end, record in self._records(self._state["offset"]):
            if "points" in record and len(points) + len(record["points"]) <= INGEST_BATCH:
                points += record["points"]
                points_end = end
                continue
            if points:
                yield points_end, "points", points
                points = []
            if "points" in record:
                points, points_end = list(record["points"]), end
            else:
                kind = next(iter(record))
                yield end, kind, record[kind]
        if points:
            yield points_end, "points", points

    def _records(self, offset: int) -> Iterator[tuple[int, dict]]:
        with self.path.open("rb") as file:
            file.seek(offset)
            position = offset
            for line in file:
                if not line.endswith(b"\n"):
                    return  # cut off mid-write by a crash: the record never finished
                position += len(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    log.warning("%s: a damaged line at byte %d is skipped", self.path, position)
                    continue
                if isinstance(record, dict) and len(record) == 1:
                    yield position, record

    def _send(self, client: Client, kind: str, value: Any, done: Drained) -> None:
        if kind != "create" and self.run_id is None:
            done.skipped.append(f"{kind}: the run was never created")
            return
        try:
            if kind == "create":
                self._create(client, value)
            elif kind == "points":
                done.points += client.ingest_metrics(self.run_id, value)
            elif kind == "artifact":
                client.upload_artifact(
                    self.run_id, self._artifact_path(value["path"]), kind=value["kind"],
                    name=value.get("name"),
                )  # fmt: skip
                done.artifacts += 1
            elif kind == "finish":
                self._finish(client, value)
                done.finished = value["status"]
        except ApiError as error:
            if error.status in RETRY_STATUSES or error.status in (401, 403):
                raise
            done.skipped.append(f"{kind}: {error}")
            log.warning("run %s: the server refused a %s record (%s)", self.run_id, kind, error)

    def _create(self, client: Client, value: dict) -> None:
        if self.run_id is not None:
            return  # created by an earlier drain
        project = client.project_id(value.get("project"))
        run = client.start_external_run(project=project, **value["run"])
        self._state["run"] = run["id"]
        self._save_state()  # at once: a drain cut short after this must not create it again

    def _finish(self, client: Client, value: dict) -> None:
        try:
            client.finish_run(self.run_id, **value)
        except ApiError as error:
            if error.status != 400:
                raise
            if client.run(self.run_id)["status"] == value["status"]:
                return  # sent before, but the drain stopped before it wrote so
            if len(value) == 1:
                raise
            # The summary or profile refused: the status matters most.
            log.warning("run %s: the server refused the summary (%s)", self.run_id, error)
            client.finish_run(self.run_id, value["status"])

    def _artifact_path(self, relative: str) -> Path:
        """A path the spool recorded, refused if it would leave the spool directory."""
        root = self.path.parent.resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            raise SpoolError(f"{self.path}: artifact path {relative!r} is outside the spool")
        return path

    # --- progress -----------------------------------------------------------

    def _state_path(self) -> Path:
        return self.path.with_suffix(".sent")

    def _read_state(self, header: dict) -> dict:
        state = {"offset": _header_length(self.path), "run": header.get("run")}
        try:
            saved = json.loads(self._state_path().read_text())
        except FileNotFoundError:
            return state
        except (OSError, ValueError) as error:
            raise SpoolError(f"cannot read {self._state_path()} ({error})") from None
        return {**state, **saved}

    def _save_state(self) -> None:
        fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".sent.", suffix=".part")
        with os.fdopen(fd, "w") as file:
            json.dump(self._state, file)
        os.replace(temp, self._state_path())


def _lock(file, *, blocking: bool) -> None:
    if fcntl is not None:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))


def _read_header(path: Path) -> dict:
    with path.open("rb") as file:
        line = file.readline()
    try:
        header = json.loads(line)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("spool") != VERSION or "url" not in header:
        raise SpoolError(f"{path} is not a peftlab spool file")
    return header


def _header_length(path: Path) -> int:
    with path.open("rb") as file:
        return len(file.readline())
