"""PEFT Lab's Python client: the REST API at /api/v1/ as plain method calls.

    from peftlab.client import Client

    client = Client.from_config()  # what `peftlab login` saved, or PEFTLAB_URL/PEFTLAB_TOKEN
    run = client.launch_run(base_model="tiny-llama", dataset=1, method="lora",
                            method_config={"r": 8}, train_config={"steps": 30})
    for run in client.watch(run["id"]):
        print(run["status"], run["step"], run["latest"]["train_loss"])
    client.download_adapter(run["id"], "adapter/")  # loads with peft.PeftModel.from_pretrained
    client.registry_download("support-bot@production", "prod/")  # the model registry, by alias

Answers are the API's JSON as dicts; a list endpoint is an iterator over all its pages.
An error answer raises `ApiError` ("400: method_config.r: Ensure this value …"); a server
that cannot be reached raises `ServerUnreachable`. The client imports neither Django nor
torch, so scripts and the CLI start fast.
"""

import csv
import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
# "lost" is not among them: a lost run waits for a worker to resume it.
FINISHED_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
INGEST_BATCH = 5000  # points per request; the server takes up to 10,000
# Seconds between tries while the server is unreachable: about a minute, enough for a restart.
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
# A proxy in front of a server that is restarting (502-504), or a passing fault such as a
# database lock (500): a watch that has run for an hour should not die of one bad poll.
RETRY_STATUSES = frozenset({500, 502, 503, 504})
DOWNLOAD_CHUNK = 1024 * 1024
# An upload's answer waits for the server to check and store it (an adapter's check may take
# up to its ADAPTER_CHECK_TIMEOUT_S, 120 s by default).
UPLOAD_TIMEOUT_S = 300.0


class ClientError(Exception):
    """Base of every error the client raises on purpose."""


class ApiError(ClientError):
    """The server answered with an error status; `str()` reads "404: Not found."."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.body = body

    @classmethod
    def from_response(cls, response: httpx.Response) -> "ApiError":
        try:
            body = response.json()
        except ValueError:
            text = response.text.strip()
            message = text[:200] if text and not text.startswith("<") else response.reason_phrase
            return cls(response.status_code, message or "error", None)
        return cls(response.status_code, error_message(body) or response.reason_phrase, body)


class ServerUnreachable(ClientError):
    """No answer from the server at all (refused, timed out, cut off). `may_have_arrived`:
    the request was sent (a timeout or a cut while waiting for the answer), so the server may
    have acted on it; False when no connection was made."""

    def __init__(self, url: str, reason: str, may_have_arrived: bool = True) -> None:
        self.url = url
        self.reason = reason
        self.may_have_arrived = may_have_arrived
        super().__init__(
            f"cannot reach {url} ({reason}): is the server running? `make run` starts it"
        )


class ConfigError(ClientError):
    """No usable credentials: `peftlab login` writes them."""


class DownloadError(ClientError):
    """An artifact that must not be written (a path in its name) or that arrived damaged."""


def error_message(body: Any, prefix: str = "") -> str:
    """DRF's error JSON as one line: {"detail": "x"} → "x"; {"a": {"b": ["y"]}} → "a.b: y"."""
    if isinstance(body, dict):
        parts = [
            error_message(value, "" if key in _UNNAMED and not prefix else f"{prefix}{key}.")
            for key, value in body.items()
        ]
    elif isinstance(body, list) and not all(isinstance(item, str) for item in body):
        # A list of objects (one per item sent): {} for the good ones, so keep the index.
        parts = [error_message(item, f"{prefix}{i}.") for i, item in enumerate(body)]
    else:
        text = " ".join(body) if isinstance(body, list) else str(body)
        return f"{prefix[:-1]}: {text}" if prefix and text else text
    return "; ".join(part for part in parts if part)


_UNNAMED = ("detail", "non_field_errors")  # keys whose messages read well without their name


class Client:
    """One PEFT Lab server, authenticated with a personal API token (`plt_…`)."""

    retry_delays: tuple[float, ...] = RETRY_DELAYS

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": "peftlab-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    @classmethod
    def from_config(cls, **options: Any) -> "Client":
        """The server and token `peftlab login` saved; PEFTLAB_URL / PEFTLAB_TOKEN override them."""
        url, token = load_config()
        return cls(url, token, **options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def page_url(self, path: str) -> str:
        """A page of the web app (the run JSON's "url") as an address for a browser."""
        return str(httpx.URL(self.url + "/").join(path))

    # --- account ------------------------------------------------------------

    def me(self) -> dict:
        return self._call("GET", "/api/v1/me/")

    def create_token(self, username: str, password: str, name: str) -> dict:
        """A new API token ({"id", "name", "token"}) from a username and password."""
        payload = {"username": username, "password": password, "name": name}
        return self._call("POST", "/api/v1/auth/token/", json=payload)

    # --- catalogue, projects, datasets --------------------------------------

    def models(self) -> list[dict]:
        return self._call("GET", "/api/v1/models/")

    def methods(self) -> list[dict]:
        return self._call("GET", "/api/v1/methods/")

    def projects(self) -> list[dict]:
        return self._call("GET", "/api/v1/projects/")

    def datasets(self) -> Iterator[dict]:
        return self._pages("/api/v1/datasets/")

    def dataset_upload(self, path: str | os.PathLike, *, name: str, team: int, task: str) -> dict:
        path = Path(path)
        with path.open("rb") as file:
            return self._call(
                "POST",
                "/api/v1/datasets/",
                data={"name": name, "team": str(team), "task": task},
                files={"file": (path.name, file)},
            )

    # --- runs ---------------------------------------------------------------

    def runs(self, **filters: Any) -> Iterator[dict]:
        """Runs matching method=, base_model=, dataset=, status=, tag=, sweep=, and q=, terms
        a run must all match ("eval_loss<1.2 config.lora.r=8 tag=best", or words of its
        name), in sort= order ("newest", or a key such as "-eval_exact_match")."""
        return self._pages("/api/v1/runs/", _present(filters))

    def run(self, run_id: int) -> dict:
        return self._call("GET", f"/api/v1/runs/{run_id}/")

    def launch_run(
        self,
        *,
        base_model: str,
        dataset: int,
        method: str,
        method_config: dict | None = None,
        train_config: dict | None = None,
        name: str | None = None,
        project: int | None = None,
        external: bool = False,
        devices: int | None = None,
        gpu_class: str | None = None,
        priority: int | None = None,
    ) -> dict:
        """A queued run (or, with external=True, a running one this script feeds and finishes);
        devices, gpu_class and priority left out take the server's defaults (1, any, 0)."""
        payload = {
            "base_model": base_model,
            "dataset": dataset,
            "method": method,
            "method_config": method_config or {},
            "train_config": train_config or {},
            "external": external,
        }
        payload.update(_present({"name": name, "project": project}))
        payload.update(_present({"devices": devices, "gpu_class": gpu_class, "priority": priority}))
        return self._call("POST", "/api/v1/runs/", json=payload)

    def cancel_run(self, run_id: int) -> dict:
        return self._call("POST", f"/api/v1/runs/{run_id}/cancel/")

    # --- playground ---------------------------------------------------------

    def ask(self, runs: Iterable[int], text: str) -> dict:
        """Queue a playground prompt for the base model and these runs' adapters."""
        return self._call("POST", "/api/v1/playground/", json={"runs": list(runs), "text": text})

    def playground_prompt(self, prompt_id: int) -> dict:
        return self._call("GET", f"/api/v1/playground/{prompt_id}/")

    def wait_answers(self, prompt_id: int, interval: float = 1.0) -> dict:
        """The prompt once a worker has answered it (or failed to)."""
        *_, last = self._watch(
            lambda: self.playground_prompt(prompt_id),
            lambda prompt: prompt["status"] in ("done", "failed"),
            interval,
        )
        return last

    def delete_run(self, run_id: int) -> None:
        self._call("DELETE", f"/api/v1/runs/{run_id}/")

    def metrics(
        self, run_id: int, keys: Iterable[str] | None = None, max_points: int | None = None
    ) -> dict[str, dict[str, list]]:
        """{key: {"step": [...], "value": [...]}}, downsampled to max_points if given. Without
        keys, every key of the run: the server answers a page of keys at a time, followed here
        to the last page."""
        params = _present({"keys": ",".join(keys) if keys else None, "max_points": max_points})
        series: dict[str, dict[str, list]] = {}
        while True:
            page = self._call("GET", f"/api/v1/runs/{run_id}/metrics/", params=params)
            series.update(page["series"])
            if not page.get("next_cursor"):
                return series
            params["cursor"] = page["next_cursor"]

    def metric_points(self, run_id: int) -> Iterator[dict]:
        """Every stored point of the run, not downsampled: {"step", "key", "value",
        "wall_time"} by key then step, read as the server streams metrics.csv."""
        with self._stream("GET", f"/api/v1/runs/{run_id}/metrics.csv") as response:
            rows = csv.reader(response.iter_lines())
            if next(rows, None) != ["step", "key", "value", "wall_time"]:
                raise ApiError(response.status_code, f"{self.url}: not a metrics CSV")
            for step, key, value, wall_time in rows:
                yield {
                    "step": int(step),
                    "key": key,
                    "value": float(value),
                    "wall_time": float(wall_time),
                }

    def ingest_metrics(self, run_id: int, points: Iterable[dict]) -> int:
        """Send an external run's points ({"key", "step", "value", "wall_time"}: seconds since
        its start); returns the count the server received, in batches it accepts. A retried
        batch is harmless: points already stored are kept as they were."""
        received = 0
        for batch in _batches(points, INGEST_BATCH):
            answer = self._call("POST", f"/api/v1/runs/{run_id}/metrics/", json={"points": batch})
            received += answer["received"]
        return received

    def finish_run(
        self, run_id: int, status: str, summary: dict | None = None, profile: dict | None = None
    ) -> dict:
        payload = {"status": status, **_present({"summary": summary, "profile": profile})}
        return self._call("POST", f"/api/v1/runs/{run_id}/finish/", json=payload)

    def start_external_run(
        self,
        *,
        base_model: str | None = None,
        method: str | None = None,
        project: int | None = None,
        name: str | None = None,
        method_config: dict | None = None,
        train_config: dict | None = None,
        tags: Iterable[str] | None = None,
        dataset: int | None = None,
        profile: dict | None = None,
    ) -> dict:
        """A running run for a script that trains elsewhere: any base model and method name,
        no dataset needed. Feed it with ingest_metrics and upload_artifact, end it with
        finish_run (peftlab.init does all of this)."""
        payload = {
            "external": True,
            "method_config": method_config or {},
            "train_config": train_config or {},
            "tags": list(tags or []),
        }
        payload.update(_present({"base_model": base_model, "method": method, "name": name}))
        payload.update(_present({"project": project, "dataset": dataset, "profile": profile}))
        return self._call("POST", "/api/v1/runs/", json=payload)

    def project_id(self, ref: int | str | None) -> int | None:
        """A project named by id, "Team/Project" or its name alone (one where you may launch);
        None stays None (the server's default)."""
        if ref is None or isinstance(ref, int):
            return ref
        launchable = [p for p in self.projects() if p.get("can_launch", True)]
        team, _, name = ref.rpartition("/")
        matches = [p for p in launchable if p["name"] == name and team in ("", p["team"]["name"])]
        if len(matches) == 1:
            return matches[0]["id"]
        names = ", ".join(f"{p['team']['name']}/{p['name']}" for p in (matches or launchable))
        if matches:
            raise ClientError(f"project {ref!r} is in several teams; name one: {names}")
        raise ClientError(f"no project {ref!r} where you may launch runs; yours: {names or 'none'}")

    def upload_artifact(
        self, run_id: int, path: str | os.PathLike, *, kind: str = "file", name: str | None = None
    ) -> dict:
        """An external run's file (kind "file"), or its HF PEFT adapter: a directory holding
        adapter_config.json and adapter_model.safetensors (kind "adapter")."""
        path = Path(path)
        if kind == "adapter":
            config, weights = adapter_files(path)
            with config.open("rb") as config_file, weights.open("rb") as weights_file:
                files = {
                    "config_file": (config.name, config_file),
                    "weights_file": (weights.name, weights_file),
                }
                return self._call(
                    "POST",
                    f"/api/v1/runs/{run_id}/artifacts/",
                    data={"kind": kind},
                    files=files,
                    timeout=UPLOAD_TIMEOUT_S,
                )
        data = {"kind": kind, "name": name or path.name, "sha256": file_sha256(path)}
        with path.open("rb") as file:
            return self._call(
                "POST",
                f"/api/v1/runs/{run_id}/artifacts/",
                data=data,
                files={"file": (path.name, file)},
                timeout=UPLOAD_TIMEOUT_S,
            )

    def watch(self, run_id: int, interval: float = 2.0) -> Iterator[dict]:
        """The run, once per poll, until it has finished (the last one yielded is finished)."""
        return self._watch(lambda: self.run(run_id), _run_finished, interval)

    # --- artifacts ----------------------------------------------------------

    def artifacts(self, run_id: int) -> list[dict]:
        return self._call("GET", f"/api/v1/runs/{run_id}/artifacts/")

    def download_adapter(self, run_id: int, directory: str | os.PathLike) -> list[Path]:
        """Write the run's adapter files into directory; each is checked against its size and
        sha256 before it takes its name. Returns the paths written (none if it has no adapter)."""
        adapter = [a for a in self.artifacts(run_id) if a["kind"] == "adapter"]
        for artifact in adapter:  # all names first: a hostile listing writes nothing
            _require_plain_name(artifact["name"])
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return [self._download(artifact, directory) for artifact in adapter]

    def _download(self, artifact: dict, directory: Path) -> Path:
        # A hidden temp name until the checks pass: a reader never sees a half-written file.
        # open("xb") leaves the mode to the umask, as for any file the user writes.
        part = directory / f".{artifact['name']}.{secrets.token_hex(4)}.part"
        try:
            with part.open("xb") as file:
                digest, size = self._stream_into(
                    file, f"/api/v1/artifacts/{artifact['id']}/download/"
                )
            _check_download(artifact, digest, size)
        except ApiError as error:
            part.unlink(missing_ok=True)
            if error.status == 409:  # the server found the stored file damaged
                raise DownloadError(str(error)) from error
            raise
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        target = directory / artifact["name"]
        os.replace(part, target)
        return target

    def _stream_into(self, file, path: str) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        with self._stream("GET", path) as response:
            for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                file.write(chunk)
        return digest.hexdigest(), size

    # --- model registry (adapters by name, version and alias) ---------------

    def registry(self, team: int | str | None = None) -> list[dict]:
        """The registered models of your teams (of one, by id or name, with team=)."""
        return self._call("GET", "/api/v1/registry/", params=_present({"team": team}))

    def registry_get(self, ref: str, team: int | str | None = None) -> dict:
        """A registered model by name, with its versions and aliases; or one version by
        "name@alias" or "name@v3", with its run, metrics and files (id, name, size, sha256)."""
        return self._call("GET", _registry_path(ref), params=_present({"team": team}))

    def register(
        self, run_id: int, name: str, adapter_version: int | None = None, description: str = ""
    ) -> dict:
        """Register the run's adapter (its newest version unless adapter_version) as the next
        version of `name` in the run's team, creating the name there if it is new."""
        team = self.run(run_id)["project"]["team"]["id"]
        payload = {"run": run_id, **_present({"adapter_version": adapter_version})}
        payload["description"] = description
        path = f"{_registry_path(name)}versions/"
        try:
            return self._call("POST", path, params={"team": team}, json=payload)
        except ApiError as error:
            if error.status != 404:  # the run was found above: the name is new
                raise
        self._call("POST", "/api/v1/registry/", json={"name": name, "team": team})
        return self._call("POST", path, params={"team": team}, json=payload)

    def registry_alias(
        self, name: str, version: int, alias: str, team: int | str | None = None
    ) -> dict:
        """Point `alias` of `name` at version N (create it, or move it: the server audits it)."""
        path = f"{_registry_path(name)}aliases/{_quoted(alias)}/"
        params = _present({"team": team})
        return self._call("PUT", path, params=params, json={"version": version})

    def registry_download(
        self, ref: str, directory: str | os.PathLike, team: int | str | None = None
    ) -> list[Path]:
        """Write the adapter files of "name@alias" or "name@vN" into directory, each checked
        against its size and sha256 before it takes its name (as download_adapter does).
        The alias is read once: the files are those of the version it named then."""
        if "@" not in ref:
            raise ClientError(f"name a version: {ref}@production or {ref}@v1")
        version = self.registry_get(ref, team=team)
        files = version["files"]
        for artifact in files:  # all names first: a hostile listing writes nothing
            _require_plain_name(artifact["name"])
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return [self._download(artifact, directory) for artifact in files]

    # --- sweeps -------------------------------------------------------------

    def sweeps(self) -> Iterator[dict]:
        return self._pages("/api/v1/sweeps/")

    def sweep(self, sweep_id: int) -> dict:
        return self._call("GET", f"/api/v1/sweeps/{sweep_id}/")

    def launch_sweep(
        self,
        *,
        base_model: str,
        dataset: int,
        methods: Iterable[str],
        grid: dict[str, list] | None = None,
        train_config: dict | None = None,
        name: str | None = None,
        project: int | None = None,
        seeds: int | None = None,
        devices: int | None = None,
        gpu_class: str | None = None,
        priority: int | None = None,
    ) -> dict:
        """One queued run per method and grid point ({"lora.r": [4, 8]}), `seeds` runs each
        (seeds seed, seed + 1, …); the sweep with its runs. devices, gpu_class and priority
        apply to every run."""
        payload = {
            "base_model": base_model,
            "dataset": dataset,
            "methods": list(methods),
            "grid": grid or {},
            "train_config": train_config or {},
        }
        payload.update(_present({"name": name, "project": project, "seeds": seeds}))
        payload.update(_present({"devices": devices, "gpu_class": gpu_class, "priority": priority}))
        return self._call("POST", "/api/v1/sweeps/", json=payload)

    def watch_sweep(self, sweep_id: int, interval: float = 2.0) -> Iterator[dict]:
        """The sweep with its runs, once per poll, until every run has finished."""
        return self._watch(lambda: self.sweep(sweep_id), _sweep_finished, interval)

    # --- the wire -----------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer (None for an empty one); an error status raises ApiError."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise self._unreachable(error) from None
        if response.is_error:
            raise ApiError.from_response(response)
        if response.is_redirect:  # e.g. http:// to https:// behind a proxy: not followed
            where = response.headers.get("location", "elsewhere")
            raise ApiError(response.status_code, f"{self.url} redirects to {where}: use that URL")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ApiError(
                response.status_code, f"{self.url} did not answer JSON: is it a PEFT Lab server?"
            ) from None

    @contextmanager
    def _stream(self, method: str, path: str) -> Iterator[httpx.Response]:
        try:
            with self._http.stream(method, path) as response:
                if response.is_error:
                    response.read()
                    raise ApiError.from_response(response)
                yield response
        except httpx.TransportError as error:
            raise self._unreachable(error) from None

    def _unreachable(self, error: httpx.TransportError) -> ServerUnreachable:
        not_sent = isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)
        return ServerUnreachable(self.url, str(error) or type(error).__name__, not not_sent)

    def _pages(self, path: str, params: dict | None = None) -> Iterator[dict]:
        """Every result of a paginated list, following "next" (its query, on our own URL, so a
        proxy that rewrites the host cannot send us elsewhere)."""
        params = dict(params or {})
        while True:
            page = self._call("GET", path, params=params)
            yield from page["results"]
            if not page.get("next"):
                return
            params = dict(httpx.URL(page["next"]).params)

    def _watch(
        self, fetch: Callable[[], dict], finished: Callable[[dict], bool], interval: float
    ) -> Iterator[dict]:
        while True:
            current = self._fetch_patiently(fetch)
            yield current
            if finished(current):
                return
            time.sleep(interval)

    def _fetch_patiently(self, fetch: Callable[[], dict]) -> dict:
        """fetch(), retried with backoff while the server is down or restarting."""
        for delay in self.retry_delays:
            try:
                return fetch()
            except ServerUnreachable as error:
                problem = f"cannot reach {error.url} ({error.reason})"
            except ApiError as error:
                if error.status not in RETRY_STATUSES:
                    raise
                problem = str(error)
            log.warning("%s; trying again in %g s", problem, delay)
            time.sleep(delay)
        return fetch()


def _run_finished(run: dict) -> bool:
    return run["status"] in FINISHED_STATUSES


def _sweep_finished(sweep: dict) -> bool:
    return all(_run_finished(run) for run in sweep["runs"])


def _present(values: dict) -> dict:
    return {key: value for key, value in values.items() if value is not None}


def _batches(points: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for point in points:
        batch.append(point)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_files(directory: Path) -> tuple[Path, Path]:
    """An HF PEFT adapter directory's two files; ClientError naming what is missing."""
    paths = tuple(directory / name for name in ADAPTER_FILES)
    missing = [path.name for path in paths if not path.is_file()]
    if not directory.is_dir() or missing:
        raise ClientError(
            f"{directory} is not an adapter directory: it needs {' and '.join(ADAPTER_FILES)}"
            + (f" ({', '.join(missing)} missing)" if directory.is_dir() else "")
        )
    return paths


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(DOWNLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _quoted(part: str) -> str:
    return quote(str(part), safe="@")


def _registry_path(ref: str) -> str:
    return f"/api/v1/registry/{_quoted(ref)}/"


def _require_plain_name(name: str) -> None:
    """A file name the server gave must stay inside the download directory."""
    plain = (
        isinstance(name, str)
        and bool(name)
        and name == Path(name).name
        and not any(sep in name for sep in ("/", "\\", "\x00"))
        and not name.startswith(".")
    )
    if not plain:
        raise DownloadError(f"refusing artifact name {name!r}: not a plain file name")


def _check_download(artifact: dict, sha256: str, size: int) -> None:
    if size != artifact["size"] or sha256 != artifact["sha256"]:
        raise DownloadError(
            f"{artifact['name']} arrived damaged: {size:,} bytes with sha256 {sha256[:12]}…, "
            f"expected {artifact['size']:,} bytes with {artifact['sha256'][:12]}…"
        )


# --- credentials -------------------------------------------------------------


def config_path() -> Path:
    """$PEFTLAB_CONFIG, else $XDG_CONFIG_HOME/peftlab/config.json (~/.config by default)."""
    if os.environ.get("PEFTLAB_CONFIG"):
        return Path(os.environ["PEFTLAB_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "peftlab" / "config.json"


def load_config() -> tuple[str, str]:
    """(url, token): PEFTLAB_URL / PEFTLAB_TOKEN, else the saved file's values."""
    saved = _read_config(config_path())
    token = os.environ.get("PEFTLAB_TOKEN") or saved.get("token")
    url = os.environ.get("PEFTLAB_URL") or saved.get("url") or DEFAULT_URL
    if not token:
        raise ConfigError(
            f"no PEFT Lab credentials in {config_path()}: run `peftlab login` "
            "(or set PEFTLAB_URL and PEFTLAB_TOKEN)"
        )
    return url, token


def _read_config(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {path} ({error}): run `peftlab login` again") from None
    return saved if isinstance(saved, dict) else {}


def save_config(url: str, token: str) -> Path:
    """Write {"url", "token"} readable by the owner only (a new directory gets 0700)."""
    path = config_path()
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    # mkstemp creates the file with mode 0600, then a rename: no moment where the token is
    # readable by others, and no half-written file if we are interrupted.
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".config.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as file:
            json.dump({"url": url.rstrip("/"), "token": token}, file, indent=2)
            file.write("\n")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def login(url: str, username: str, password: str, name: str, **options: Any) -> str:
    """A new API token for username on the server at url (options go to `Client`)."""
    with Client(url, **options) as client:
        return client.create_token(username, password, name)["token"]
