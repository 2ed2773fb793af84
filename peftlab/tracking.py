"""Track a training that runs anywhere, as `wandb.init/log` do:

    import peftlab

    run = peftlab.init(project="Default", name="my-lora", config={"learning_rate": 2e-4},
                       base_model="meta-llama/Llama-3.2-1B", method="lora")
    for step in range(steps):
        ...
        run.log({"train_loss": loss, "custom/x": x})       # step: 0, 1, 2… unless given
    run.log_artifact("out/adapter", kind="adapter")        # adapter_config.json + safetensors
    run.summary["eval_exact_match"] = 0.71
    run.finish()   # or at exit: "failed" after an uncaught exception, "cancelled" after Ctrl-C

`log` returns at once. One thread per run sends its points in order, in batches (every
BATCH_POINTS points or BATCH_SECONDS), retrying a request with backoff. While the server
cannot be reached, points, artifacts and the finish go to a spool file (peftlab/spool.py);
the thread sends it when the server answers again, and `peftlab sync` sends what a finished
script left behind. The server, the token and the spool directory come from the arguments,
PEFTLAB_URL / PEFTLAB_TOKEN / PEFTLAB_SPOOL_DIR, or what `peftlab login` saved.
"""

import atexit
import json
import logging
import math
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from peftlab.client import (
    DEFAULT_URL,
    RETRY_STATUSES,
    ApiError,
    Client,
    ClientError,
    ConfigError,
    ServerUnreachable,
    adapter_files,
    load_config,
)
from peftlab.spool import Spool

logger = logging.getLogger("peftlab")

# The server's rules for a point (webapp/api/serializers.py: METRIC_KEY, MetricPointSerializer).
METRIC_KEY = re.compile(r"[A-Za-z0-9_./-]{1,64}")
MAX_STEP = 2**31 - 1
BATCH_POINTS = 500  # a request once this many points wait…
BATCH_SECONDS = 1.0  # …or at least once a second
SEND_DELAYS = (0.25, 0.5, 1.0, 2.0)  # retries of a request before its record goes to the spool
DRAIN_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # between tries to send the spool; the last repeats
HTTP_TIMEOUT_S = 10.0
ARTIFACT_KINDS = ("adapter", "file")
FINISHED = ("succeeded", "failed", "cancelled")
# Keyword arguments for every Client init makes; tests put an in-process transport here.
client_options: dict[str, Any] = {"timeout": HTTP_TIMEOUT_S}


class Run:
    """A run this script trains; `peftlab.init` makes one."""

    # How long finish() keeps trying a server that does not answer before it leaves the rest
    # in the spool for `peftlab sync`.
    finish_wait_s: float = 10.0

    def __init__(self, client: Client, created: dict | None, create: dict | None) -> None:
        self.id: int | None = created["id"] if created else None
        self.url: str | None = client.page_url(created["url"]) if created else None
        self.summary: dict[str, Any] = {}  # sent at finish, over the last value of each key
        self.profile: dict[str, Any] = {}  # trainable_params, total_params, adapter_bytes
        self._latest: dict[str, float] = {}
        self._next_step = 0
        self._start = time.monotonic()
        self._keys: set[str] = set()  # keys already checked
        self._nonfinite: set[str] = set()  # keys already warned about
        self._finished = False
        self._exit_status: str | None = None  # at exit without an uncaught exception
        self._pid = os.getpid()  # a forked child's exit does not finish its parent's run
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # The sender sleeps until a batch is full, a second has passed or a request waits:
        # waking it for every log() would cost more than the log() itself.
        self._wake = threading.Event()
        self._queued = 0  # points put since the sender last took the queue
        self._sender = _Sender(self, client, create)
        self._sender.start()

    @property
    def finished(self) -> bool:
        return self._finished

    def __repr__(self) -> str:
        return f"<peftlab.Run {self.id if self.id is not None else '(not created yet)'}>"

    def log(self, data: Mapping[str, Any], step: int | None = None) -> None:
        """Record numbers at a step (default: one after the last step logged, from 0). A key is
        1-64 of A-Z a-z 0-9 _ . / - (ValueError otherwise); a NaN or infinite value is skipped
        with a warning, as the server stores only finite numbers."""
        if self._finished:
            raise RuntimeError(f"{self!r} is finished; peftlab.init() starts another")
        step = self._next_step if step is None else _checked_step(step)
        self._next_step = step + 1
        wall = time.monotonic() - self._start
        numbers = []  # the sender makes the points: less work in the training thread
        for key, value in data.items():
            number = self._number(key, value)
            if number is not None:
                numbers.append((key, number))
                self._latest[key] = number
        if numbers:
            self._queue.put(("points", (step, wall, numbers), None))
            self._queued += len(numbers)
            if self._queued >= BATCH_POINTS:
                self._wake.set()

    def log_artifact(
        self, path: str | Path, kind: str = "file", name: str | None = None
    ) -> list[dict] | None:
        """Upload a file, or an HF PEFT adapter directory (kind="adapter": adapter_config.json
        and adapter_model.safetensors), after the points logged before. Returns the stored
        files as the server lists them, or None when the server is unreachable: a copy then
        waits in the spool."""
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(ARTIFACT_KINDS)}, not {kind!r}")
        path = Path(path)
        if kind == "adapter":
            adapter_files(path)
        elif not path.is_file():
            raise FileNotFoundError(f"no file {path}")
        if self._finished:
            raise RuntimeError(f"{self!r} is finished; log artifacts before finish()")
        return self._ask("artifact", (kind, path, name))

    def flush(self) -> None:
        """Wait until every point logged so far is sent (or, with the server away, spooled)."""
        if not self._finished:
            self._ask("flush", None)

    def finish(self, status: str = "succeeded") -> None:
        """Send what is left, then the status and summary; waits until they are sent or
        spooled. A second call does nothing."""
        if status not in FINISHED:
            raise ValueError(f"status must be one of {', '.join(FINISHED)}, not {status!r}")
        if self._finished:
            return
        self._finished = True
        _open_runs.pop(id(self), None)
        payload = {"status": status, "summary": _json_safe({**self._latest, **self.summary})}
        if self.profile:
            payload["profile"] = _json_safe(self.profile)
        self._queue.put(("finish", payload, None))
        self._wake.set()
        self._sender.join()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.finish(_status_after(exc_type) if exc_type else "succeeded")

    def _ask(self, kind: str, value: Any) -> Any:
        """Hand the sender a request in line with the points, and wait for its answer."""
        reply = _Reply()
        self._queue.put((kind, value, reply))
        self._wake.set()
        return reply.wait()

    def _number(self, key: str, value: Any) -> float | None:
        if key not in self._keys:
            if not isinstance(key, str) or not METRIC_KEY.fullmatch(key):
                raise ValueError(f"metric key {key!r}: use 1-64 of A-Z a-z 0-9 _ . / -")
            self._keys.add(key)
        if type(value) is float and value - value == 0.0:  # finite: the common case, quickly
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{key}: {type(value).__name__} is not a number") from None
        if math.isfinite(number):
            return number
        if key not in self._nonfinite:
            self._nonfinite.add(key)
            logger.warning("peftlab: %s is %s; non-finite values are not stored", key, number)
        return None


class _Reply:
    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def set(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error
        self._done.set()

    def wait(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _Sender(threading.Thread):
    """Takes the run's queue in order: batches points, sends each request with retries, and
    falls back to the spool while the server is away (then drains it on a backoff)."""

    def __init__(self, run: Run, client: Client, create: dict | None) -> None:
        super().__init__(name="peftlab-sender", daemon=True)  # atexit finishes, then joins it
        self.run_ = run
        self.client = client
        self.spool: Spool | None = None
        self.drain_at = 0.0
        self.failures = 0
        if create is not None:  # started while the server was unreachable
            self.spool = Spool.create(client.url, None)
            self.spool.append({"create": create})

    def run(self) -> None:
        while True:
            self.run_._wake.wait(self._timeout())
            self.run_._wake.clear()
            self.run_._queued = 0
            pending: list[dict] = []
            for kind, value, reply in self._taken():
                if kind == "points":
                    step, wall, numbers = value
                    pending += [
                        {"key": key, "step": step, "value": number, "wall_time": wall}
                        for key, number in numbers
                    ]
                    continue
                if pending:  # the points logged before the request go first
                    self._guarded(self._deliver, "points", pending)
                    pending = []
                if kind == "artifact":
                    self._answer(reply, self._artifact, *value)
                elif kind == "flush":
                    reply.set()
                elif kind == "finish":
                    self._guarded(self._finish, value)
                    return
            if pending:
                self._guarded(self._deliver, "points", pending)
            if self.spool is not None and time.monotonic() >= self.drain_at:
                self._guarded(self._drain)

    def _timeout(self) -> float:
        if self.spool is None:
            return BATCH_SECONDS
        return min(BATCH_SECONDS, max(0.0, self.drain_at - time.monotonic()))

    def _taken(self) -> Iterator[tuple[str, Any, Any]]:
        """Everything in the queue now, in order."""
        while True:
            try:
                yield self.run_._queue.get_nowait()
            except queue.Empty:
                return

    @staticmethod
    def _guarded(action: Callable[..., Any], *args: Any) -> None:
        """A bug here must not end the thread: the points after it still go."""
        try:
            action(*args)
        except Exception:
            logger.exception("peftlab: sending failed")

    @staticmethod
    def _answer(reply: _Reply, action: Callable[..., Any], *args: Any) -> None:
        try:
            reply.set(action(*args))
        except Exception as error:
            reply.set(error=error)

    # --- records ------------------------------------------------------------

    def _deliver(self, kind: str, value: Any) -> None:
        """Send a points or finish record live, or append it to the spool (in order: while a
        spool exists, everything after goes there too)."""
        if self.spool is None:
            call = self._request(kind, value)
            try:
                self._send(call)
                return
            except ApiError as error:
                if error.status not in RETRY_STATUSES:
                    logger.warning(
                        "peftlab: the server refused run %s's %s: %s", self.run_.id, kind, error
                    )
                    if kind == "finish" and len(value) > 1:  # the status matters most
                        self._deliver(kind, {"status": value["status"]})
                    return
                self._go_offline(error)
            except ServerUnreachable as error:
                self._go_offline(error)
        self.spool.append({kind: value})

    def _request(self, kind: str, value: Any) -> Callable[[], Any]:
        run_id = self.run_.id
        if kind == "points":
            return lambda: self.client.ingest_metrics(run_id, value)
        return lambda: self.client.finish_run(run_id, **value)

    def _artifact(self, kind: str, path: Path, name: str | None) -> dict | None:
        if self.spool is None:
            call = partial(self.client.upload_artifact, self.run_.id, path, kind=kind, name=name)
            try:
                return self._send(call, resend=False)
            except ApiError as error:
                if error.status not in RETRY_STATUSES:
                    raise
                self._go_offline(error)
            except ServerUnreachable as error:
                if error.may_have_arrived:  # sent again, it could be stored twice
                    logger.warning(
                        "peftlab: no answer to the upload of %s (%s); it may be stored: see "
                        "run %s's page",
                        path,
                        error.reason,
                        self.run_.id,
                    )
                    return None
                self._go_offline(error)
        self.spool.keep_artifact(kind, path, name)
        return None

    def _finish(self, payload: dict) -> None:
        self._deliver("finish", payload)
        if self.spool is None:
            return
        give_up = time.monotonic() + self.run_.finish_wait_s
        self.drain_at = 0.0  # try now, then on the backoff, until give_up
        while not self._drain():
            now = time.monotonic()
            if now >= give_up:
                break
            time.sleep(max(0.0, min(self.drain_at, give_up) - now))
        else:
            return
        logger.warning(
            "peftlab: %s did not answer; run %s's last records, its finish included, are in %s. "
            "`peftlab sync` sends them.",
            self.client.url,
            self.run_.id if self.run_.id is not None else "(not created yet)",
            self.spool.path,
        )
        self.spool.close()

    # --- the wire -----------------------------------------------------------

    def _send(self, call: Callable[[], Any], *, resend: bool = True) -> Any:
        """call(), tried again after each of SEND_DELAYS while the server is away or restarting;
        resend=False: not after a request that may have arrived (one that is not idempotent)."""
        for delay in SEND_DELAYS:
            try:
                return call()
            except ServerUnreachable as error:
                if error.may_have_arrived and not resend:
                    raise
            except ApiError as error:
                if error.status not in RETRY_STATUSES:
                    raise
            time.sleep(delay)
        return call()

    def _go_offline(self, error: ClientError) -> None:
        self.spool = Spool.create(self.client.url, self.run_.id)
        self.failures, self.drain_at = 0, time.monotonic() + DRAIN_DELAYS[0]
        logger.warning(
            "peftlab: %s; run %s's points wait in %s and are sent when the server answers "
            "(or by `peftlab sync`)",
            error,
            self.run_.id,
            self.spool.path,
        )

    def _drain(self) -> bool:
        """Send the spool; True when it is all sent (and removed)."""
        try:
            done = self.spool.drain(self.client)
        except Exception as error:  # the server still away, or a fault: try again later
            delay = DRAIN_DELAYS[min(self.failures, len(DRAIN_DELAYS) - 1)]
            self.failures += 1
            self.drain_at = time.monotonic() + delay
            if not isinstance(error, ServerUnreachable | ApiError):
                logger.exception("peftlab: sending %s failed", self.spool.path)
            logger.debug("peftlab: the spool waits (%s); next try in %g s", error, delay)
            return False
        if self.run_.id is None and done.run is not None:  # created from the spool
            self.run_.id = done.run
        self.spool, self.failures = None, 0
        logger.warning(
            "peftlab: %s answers again; %d spooled points sent", self.client.url, done.points
        )
        return True


# --- the module's functions --------------------------------------------------

_current: Run | None = None
_open_runs: dict[int, Run] = {}  # not finished yet: atexit finishes them
_uncaught: type[BaseException] | None = None
_hooks_installed = False


def init(
    project: int | str | None = None,
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    tags: list[str] | tuple[str, ...] | None = None,
    base_model: str | None = None,
    method: str | None = None,
    *,
    method_config: Mapping[str, Any] | None = None,
    profile: Mapping[str, Any] | None = None,
    dataset: int | None = None,
    url: str | None = None,
    token: str | None = None,
) -> Run:
    """A new external run, now running on the server, and the current run of peftlab.log().

    project: an id, "Team/Project" or a project's name (default: your first); config: the
    training settings (stored as the run's train_config); method_config: the method's;
    base_model and method: any names ("meta-llama/Llama-3.2-1B", "lora", "full"); profile:
    {"trainable_params", "total_params"} if known. If the server cannot be reached, the run is
    created when it answers (its points wait in the spool meanwhile)."""
    global _current
    if not base_model or not method:
        raise ValueError(
            'peftlab.init needs base_model= and method=: any names, e.g. "gpt2" and "lora" '
            '(or "full" for full fine-tuning)'
        )
    client = Client(*_credentials(url, token), **client_options)
    request = {
        "name": name,
        "base_model": base_model,
        "method": method,
        "method_config": _json_safe(dict(method_config or {})),
        "train_config": _json_safe(dict(config or {})),
        "tags": list(tags or []),
        "dataset": dataset,
        "profile": _json_safe(dict(profile)) if profile else None,
    }
    try:
        created = _create(client, project, request)
        run = Run(client, created, None)
        print(f"peftlab: run {run.id} at {run.url}", file=sys.stderr)
    except ServerUnreachable as error:
        logger.warning("peftlab: %s; the run is created when it answers", error)
        run = Run(client, None, {"project": project, "run": _present(request)})
    _install_hooks()
    _open_runs[id(run)] = run
    _current = run
    return run


def log(data: Mapping[str, Any], step: int | None = None) -> None:
    """Run.log on the current run (the last peftlab.init's)."""
    if _current is None:
        raise RuntimeError("no run: call peftlab.init() first")
    _current.log(data, step=step)


def finish(status: str = "succeeded") -> None:
    """Run.finish on the current run, if there is one."""
    if _current is not None:
        _current.finish(status)


def current_run() -> Run | None:
    return _current


def _credentials(url: str | None, token: str | None) -> tuple[str, str]:
    """The arguments, else PEFTLAB_URL / PEFTLAB_TOKEN, else `peftlab login`'s file."""
    if url and token:
        return url, token
    try:
        saved_url, saved_token = load_config()
    except ConfigError:
        if not token:
            raise
        saved_url, saved_token = os.environ.get("PEFTLAB_URL") or DEFAULT_URL, token
    return url or saved_url, token or saved_token


def _create(client: Client, project: int | str | None, request: dict) -> dict:
    """The run, created with a few tries while the server is away or restarting."""
    for delay in (*SEND_DELAYS, None):
        try:
            return client.start_external_run(project=client.project_id(project), **request)
        except ServerUnreachable:
            if delay is None:
                raise
        except ApiError as error:
            if error.status not in RETRY_STATUSES or delay is None:
                raise
        time.sleep(delay)
    raise AssertionError("unreachable")


def _checked_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be an integer from 0 to {MAX_STEP}, not {step!r}")
    return step


def _json_safe(value: Any) -> Any:
    """JSON the server can store: what json cannot write becomes its str() (a Path, an enum)."""
    return json.loads(json.dumps(value, default=str, allow_nan=True), parse_constant=lambda _: None)


def _present(values: dict) -> dict:
    return {key: value for key, value in values.items() if value is not None}


def _status_after(exc_type: type[BaseException]) -> str:
    return "cancelled" if issubclass(exc_type, KeyboardInterrupt) else "failed"


def _install_hooks() -> None:
    """Finish open runs at exit: failed after an uncaught exception (seen by chaining
    sys.excepthook), cancelled after Ctrl-C."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    previous = sys.excepthook

    def excepthook(exc_type, exc, traceback):
        global _uncaught
        _uncaught = exc_type
        previous(exc_type, exc, traceback)

    sys.excepthook = excepthook
    atexit.register(_finish_at_exit)


def _finish_at_exit() -> None:
    for run in list(_open_runs.values()):
        if run._pid != os.getpid():
            continue
        status = _status_after(_uncaught) if _uncaught else run._exit_status or "succeeded"
        try:
            run.finish(status)
        except Exception:
            logger.exception("peftlab: could not finish %r at exit", run)
