"""`peftlab`: launch, follow and fetch runs on a PEFT Lab server; train locally too.

    peftlab login                                   # asks for username and password
    peftlab runs launch --model tiny-llama --dataset sample-instructions --method lora \\
                        --set r=8 --steps 30 --watch
    peftlab runs list --status running
    peftlab runs download 42 -o adapter/
    peftlab sweep launch --model tiny-llama --dataset sample-instructions \\
                         --methods lora,dora --grid lora.r=4,8 --watch
    peftlab registry register 42 support-bot && peftlab registry alias support-bot 1 production
    peftlab registry download support-bot@production -o adapter/
    peftlab sync                                    # what tracked runs kept while offline
    peftlab import mlflow --tracking-uri http://mlflow:5000 --experiment sft
    peftlab export mlflow --tracking-uri ./mlruns 42 43
    peftlab train --model tiny-llama --dataset sample-instructions --output out/   # no server

`train`, `models` and `datasets` are peft_core's local commands, imported only when used,
so the remote commands start without loading torch. Exit codes: 0 done (a watched run
succeeded), 1 an error or a run that did not succeed, 2 a bad command line, 130 Ctrl-C.
"""

import argparse
import getpass
import itertools
import json
import math
import socket
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from peftlab import spool
from peftlab.client import (
    DEFAULT_URL,
    FINISHED_STATUSES,
    ApiError,
    Client,
    ClientError,
    login,
    save_config,
)

LOCAL_COMMANDS = {
    "train": "train an adapter on this machine, no server needed",
    "models": "list the model catalogue",
    "datasets": "list the built-in sample datasets",
}
# Keyword arguments for every Client the CLI makes; tests put an in-process transport here.
client_options: dict[str, Any] = {}


class UsageError(Exception):
    """A bad command line found after parsing; `peftlab: error: …` with exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in LOCAL_COMMANDS:
            return _run_local(argv)
        args = build_parser().parse_args(argv)
        return args.run(args)
    except SystemExit as exit:  # argparse: --help (0) or a bad command line (2)
        return exit.code if isinstance(exit.code, int) else 2
    except UsageError as error:
        return _fail(str(error), code=2)
    except ApiError as error:
        return _fail(str(error) + (_LOGIN_HINT if error.status == 401 else ""))
    except ClientError as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return _fail("interrupted", code=130)


_LOGIN_HINT = " (run `peftlab login` for a new token)"


def _run_local(argv: list[str]) -> int:
    from peft_core import cli as local_cli  # imports torch: only for the commands that need it

    return local_cli.main(argv)


def _fail(message: str, *, code: int = 1) -> int:
    print(f"peftlab: error: {message}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Parameter-efficient fine-tuning: on a PEFT Lab server, or on this machine.",
        epilog="`peftlab COMMAND --help` explains each command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_login(commands)
    _add_runs(commands)
    _add_sweep(commands)
    _add_ask(commands)
    _add_registry(commands)
    _add_sync(commands)
    _add_mlflow(commands)
    for name, help_text in LOCAL_COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)  # main hands these over
    return parser


def _client() -> Client:
    return Client.from_config(**client_options)


# --- peftlab login -----------------------------------------------------------


def _add_login(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "login",
        help="save a server URL and API token for the other commands",
        description="Create an API token with your username and password (or check one you "
        "made at /settings/tokens/) and save it with the URL, readable only by you.",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    parser.add_argument("--username", help="asked for if not given")
    parser.add_argument(
        "--token", help="an existing token (plt_…) instead of a password; - reads it from stdin"
    )
    parser.set_defaults(run=run_login)


def run_login(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    if args.token == "-":  # from a pipe: a token on the command line stays in shell history
        args.token = sys.stdin.readline().strip()
        if not args.token:
            raise UsageError("--token -: no token on standard input")
    token = args.token or _token_from_password(url, args.username)
    with Client(url, token, **client_options) as client:
        me = client.me()
    path = save_config(url, token)
    print(f"Logged in to {url} as {me['username']}; token saved to {path}")
    return 0


def _token_from_password(url: str, username: str | None) -> str:
    username = username or input("Username: ").strip()
    password = getpass.getpass("Password: ")
    return login(
        url, username, password, f"peftlab CLI on {socket.gethostname()}", **client_options
    )


# --- peftlab runs ------------------------------------------------------------


def _add_runs(commands: argparse._SubParsersAction) -> None:
    runs = commands.add_parser("runs", help="launch, list, watch, cancel and download runs")
    actions = runs.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_runs_launch(actions)
    _add_runs_list(actions)
    watch = actions.add_parser("watch", help="follow a run with a progress bar until it ends")
    watch.add_argument("run_id", type=int, metavar="ID")
    _add_interval(watch)
    watch.set_defaults(run=run_runs_watch)
    cancel = actions.add_parser("cancel", help="cancel a queued or running run")
    cancel.add_argument("run_id", type=int, metavar="ID")
    cancel.set_defaults(run=run_runs_cancel)
    download = actions.add_parser("download", help="download a run's adapter (HF PEFT format)")
    download.add_argument("run_id", type=int, metavar="ID")
    download.add_argument("-o", "--output", help="directory (default peftlab-run-ID-adapter)")
    download.set_defaults(run=run_runs_download)


def _add_runs_launch(actions: argparse._SubParsersAction) -> None:
    launch = actions.add_parser("launch", help="queue a training run on the server")
    _add_model_and_dataset(launch)
    launch.add_argument("--method", required=True, help="lora, dora, ia3, prompt, prefix, …")
    launch.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a method config field, e.g. --set r=8 (repeatable; the server checks it)",
    )
    _add_train_options(launch)
    launch.set_defaults(run=run_runs_launch)


def _add_model_and_dataset(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="KEY", help="a catalogue model key")
    parser.add_argument(
        "--dataset", required=True, metavar="DATASET", help="an id, a built-in key or a name"
    )


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """The training budget; an option left out takes the server's default."""
    parser.add_argument("--steps", type=int, metavar="N", help="training steps")
    parser.add_argument("--batch-size", type=int, metavar="N")
    parser.add_argument("--learning-rate", type=float, metavar="LR")
    parser.add_argument("--max-length", type=int, metavar="TOKENS", help="longer rows are cut")
    parser.add_argument("--eval-every", type=int, metavar="N", help="evaluate every N steps")
    parser.add_argument(
        "--checkpoint-every", type=int, metavar="N", help="steps between resumable checkpoints"
    )
    parser.add_argument(
        "--devices", type=int, metavar="N", help="GPUs of one data-parallel run, 1-8 (default 1)"
    )
    parser.add_argument(
        "--gpu-class",
        metavar="CLASS",
        help='a GPU class workers advertise, e.g. a100 (default "any")',
    )
    parser.add_argument(
        "--priority", type=int, metavar="P", help="-10..10: higher first in your team (default 0)"
    )
    parser.epilog = "A training option left out takes the launch form's default."
    parser.add_argument("--project", type=int, metavar="ID", help="default: your first project")
    parser.add_argument("--name")
    parser.add_argument("--watch", action="store_true", help="follow it until it ends")
    _add_interval(parser)


def _add_interval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interval", type=float, default=2.0, metavar="SECONDS", help="poll every (default 2)"
    )


def _add_runs_list(actions: argparse._SubParsersAction) -> None:
    listing = actions.add_parser("list", help="the latest runs as a table or JSON lines")
    listing.add_argument("--status", help="queued, running, succeeded, failed, cancelled, lost")
    listing.add_argument("--method")
    listing.add_argument("--model", metavar="KEY")
    listing.add_argument("--tag")
    listing.add_argument("--sweep", type=int, metavar="ID")
    listing.add_argument("--search", metavar="TEXT", help="in the run's name")
    listing.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="TERM",
        help="a term the runs must match, e.g. 'eval_loss<1.2' or config.lora.r=8 (repeatable)",
    )
    listing.add_argument(
        "--sort",
        metavar="KEY",
        help="newest (default), oldest, or a key, descending with a -: --sort=-eval_loss",
    )
    listing.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(run=run_runs_list)


def run_runs_launch(args: argparse.Namespace) -> int:
    method_config = dict(parse_assignment(a, "--set") for a in args.set)
    with _client() as client:
        dataset = resolve_dataset(client, args.dataset)
        run = client.launch_run(
            base_model=args.model,
            dataset=dataset["id"],
            method=args.method,
            method_config=method_config,
            train_config=_train_config(args),
            name=args.name,
            project=args.project,
            **_placement(args),
        )
        print(f"run {run['id']} {run['status']}: {client.page_url(run['url'])}")
        return watch_run(client, run["id"], args.interval) if args.watch else 0


def _placement(args: argparse.Namespace) -> dict:
    """Devices, GPU class and priority as given (the server judges them)."""
    return {"devices": args.devices, "gpu_class": args.gpu_class, "priority": args.priority}


def run_runs_list(args: argparse.Namespace) -> int:
    filters = {
        "status": args.status,
        "method": args.method,
        "base_model": args.model,
        "tag": args.tag,
        "sweep": args.sweep,
        "q": " ".join([*args.where, _quoted(args.search)] if args.search else args.where),
        "sort": args.sort,
        "limit": args.limit,
    }
    with _client() as client:
        runs = list(itertools.islice(client.runs(**filters), max(args.limit, 0)))
    if args.json:
        for run in runs:
            print(json.dumps(run))
    else:
        print_table(runs)
    return 0


def _quoted(text: str) -> str:
    """A name search as one term of the query language: the text, quoted, part of the name."""
    return '"' + text.replace('"', "") + '"'


def run_runs_watch(args: argparse.Namespace) -> int:
    with _client() as client:
        return watch_run(client, args.run_id, args.interval)


def run_runs_cancel(args: argparse.Namespace) -> int:
    with _client() as client:
        run = client.cancel_run(args.run_id)
    if run["status"] in FINISHED_STATUSES:
        print(f"run {run['id']} {run['status']}")
    else:  # a running run checks the flag every step
        print(f"run {run['id']}: cancel requested; it stops within one training step")
    return 0


def run_runs_download(args: argparse.Namespace) -> int:
    directory = args.output or f"peftlab-run-{args.run_id}-adapter"
    with _client() as client:
        files = client.download_adapter(args.run_id, directory)
        if not files:
            status = client.run(args.run_id)["status"]
            return _fail(f"run {args.run_id} has no adapter files (it is {status})")
    for path in files:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    print(f"load it with peft.PeftModel.from_pretrained(base, {directory!r})")
    return 0


# --- peftlab registry --------------------------------------------------------


def _add_registry(commands: argparse._SubParsersAction) -> None:
    registry = commands.add_parser(
        "registry",
        help="the model registry: adapters by name, version and alias",
        description="Register runs' adapters under a name of your team (versions 1, 2, …), "
        "point aliases such as production at a version, download by alias.",
    )
    actions = registry.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="your teams' registered models and their aliases")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    register = actions.add_parser("register", help="register a run's adapter as the next version")
    register.add_argument("run_id", type=int, metavar="RUN_ID")
    register.add_argument("name", metavar="NAME", help="created in the run's team if it is new")
    register.add_argument(
        "--adapter-version", type=int, metavar="N", help="the run's adapter version (newest)"
    )
    alias = actions.add_parser("alias", help="point an alias (production, …) at a version")
    alias.add_argument("name", metavar="NAME")
    alias.add_argument("version", type=_version_number, metavar="VERSION", help="N or vN")
    alias.add_argument("alias", metavar="ALIAS")
    download = actions.add_parser("download", help="download NAME@ALIAS or NAME@vN's adapter")
    download.add_argument("ref", metavar="NAME@ALIAS")
    download.add_argument("-o", "--output", help="directory (default NAME-ALIAS)")
    for parser, run in ((listing, run_registry_list), (register, run_registry_register),
                        (alias, run_registry_alias), (download, run_registry_download)):  # fmt: skip
        parser.add_argument("--team", help="a team id or name, where several have the name")
        parser.set_defaults(run=run)


def _version_number(text: str) -> int:
    number = text[1:] if text[:1] in ("v", "V") else text
    if not number.isdigit() or int(number) < 1:
        raise argparse.ArgumentTypeError(f"a version number such as 3 or v3, not {text!r}")
    return int(number)


def run_registry_list(args: argparse.Namespace) -> int:
    with _client() as client:
        rows = client.registry(team=args.team)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    table = [("NAME", "TEAM", "VERSIONS", "ALIASES")]
    for row in rows:
        aliases = " ".join(f"{a['name']}=v{a['version']}" for a in row["aliases"]) or "-"
        table.append((row["name"], row["team"], str(row["versions"]), aliases))
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        print("  ".join([*cells, line[-1]]).rstrip())
    return 0


def run_registry_register(args: argparse.Namespace) -> int:
    with _client() as client:
        version = client.register(args.run_id, args.name, adapter_version=args.adapter_version)
    print(f"run {version['run']} registered as {version['ref']}")
    return 0


def run_registry_alias(args: argparse.Namespace) -> int:
    with _client() as client:
        alias = client.registry_alias(args.name, args.version, args.alias, team=args.team)
    print(f"{args.name}@{alias['name']} → v{alias['version']}")
    return 0


def run_registry_download(args: argparse.Namespace) -> int:
    if "@" not in args.ref:
        raise UsageError(f"name a version: {args.ref}@production or {args.ref}@v1")
    directory = args.output or args.ref.replace("@", "-")
    with _client() as client:
        files = client.registry_download(args.ref, directory, team=args.team)
    for path in files:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    print(f"load it with peft.PeftModel.from_pretrained(base, {directory!r})")
    return 0


# --- peftlab ask -------------------------------------------------------------


def _add_ask(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "ask",
        help="ask the base model and some runs' adapters the same prompt (the playground)",
        description="A worker answers; the answers print side by side once they are in.",
    )
    parser.add_argument("runs", metavar="RUN_IDS", help="comma-separated run ids, e.g. 12,14")
    parser.add_argument("text", metavar="PROMPT", help="a prompt, or a sentence to classify")
    _add_interval(parser)
    parser.set_defaults(run=run_ask)


def run_ask(args: argparse.Namespace) -> int:
    try:
        run_ids = [int(part) for part in args.runs.split(",") if part.strip()]
    except ValueError:
        raise UsageError("RUN_IDS must be numbers separated by commas, e.g. 12,14") from None
    with _client() as client:
        prompt = client.ask(run_ids, args.text)
        print(f"asked: {prompt['url']}", file=sys.stderr)
        prompt = client.wait_answers(prompt["id"], args.interval)
    if prompt["status"] == "failed":
        return _fail(prompt["error"])
    answers = prompt["answers"]  # a JSON object: print in a fixed order, base model first
    for key in ["base", *(str(run_id) for run_id in prompt["runs"])]:
        if key not in answers:
            continue  # a classifier's base model has no trained head, so no answer
        answer = answers[key]
        title = "base model" if key == "base" else f"run {key}"
        if "text" in answer:
            print(f"--- {title}\n{answer['text']}")
        else:
            scores = ", ".join(f"{label} {p:.3f}" for label, p in answer["scores"].items())
            print(f"--- {title}\n{answer['label']} ({scores})")
    return 0


# --- peftlab sync ------------------------------------------------------------


def _add_sync(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "sync",
        help="send what tracked runs (peftlab.init) kept while the server was unreachable",
        description="Sends each spool file's points, artifacts and finish, in order, and removes "
        "it. Sending twice changes nothing. A file of a script that is still running is left "
        "to that script.",
    )
    parser.add_argument(
        "--dir", metavar="DIR", help="the spool directory (default $PEFTLAB_SPOOL_DIR or "
        "~/.local/share/peftlab/spool)",
    )  # fmt: skip
    parser.set_defaults(run=run_sync)


def run_sync(args: argparse.Namespace) -> int:
    directory = Path(args.dir).expanduser() if args.dir else spool.spool_dir()
    paths = spool.spool_files(directory)
    if not paths:
        print(f"nothing to send: no spool files in {directory}")
        return 0
    left = 0
    with _client() as client:
        for path in paths:
            line, sent = _sync_one(client, path)
            print(f"{path.name}: {line}")
            left += not sent
    return 1 if left else 0


# --- peftlab import mlflow / export mlflow ----------------------------------


def _add_mlflow(commands: argparse._SubParsersAction) -> None:
    importing = commands.add_parser("import", help="bring runs in from another tracker")
    source = importing.add_subparsers(dest="source", required=True, metavar="SOURCE")
    mlflow_in = source.add_parser(
        "mlflow",
        help="runs of an MLflow tracking server or store, as runs trained elsewhere",
        description="Params, metrics with their steps, tags, status and artifacts (an HF PEFT "
        "adapter folder becomes the run's adapter, other files the run's files). Again later: "
        "runs already imported are skipped, those left running take their new points. "
        "Needs pip install 'peftlab[mlflow]'.",
    )
    _add_tracking_uri(mlflow_in)
    mlflow_in.add_argument("--experiment", metavar="NAME", help="only this experiment's runs")
    mlflow_in.add_argument("--run-id", action="append", default=[], metavar="ID",
                           help="only this MLflow run (repeatable)")  # fmt: skip
    mlflow_in.add_argument("--project", help="where the runs go: an id, Team/Project or name")
    mlflow_in.add_argument("--no-artifacts", action="store_true", help="leave the files behind")
    mlflow_in.set_defaults(run=run_import_mlflow)
    exporting = commands.add_parser("export", help="send runs to another tracker")
    target = exporting.add_subparsers(dest="target", required=True, metavar="TARGET")
    mlflow_out = target.add_parser(
        "mlflow",
        help="finished runs to an MLflow tracking server or store",
        description="Params (base_model, method and the configs, flattened), every metric "
        "point with its step, tags, status, start and end, and the adapter as artifacts. A "
        "run already exported to the experiment is skipped. Needs pip install "
        "'peftlab[mlflow]'.",
    )
    _add_tracking_uri(mlflow_out)
    mlflow_out.add_argument("--experiment", default="PEFT Lab", metavar="NAME",
                            help="made if missing (default: PEFT Lab)")  # fmt: skip
    mlflow_out.add_argument("run_ids", nargs="+", type=int, metavar="RUN_ID")
    mlflow_out.set_defaults(run=run_export_mlflow)


def _add_tracking_uri(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri", required=True, metavar="URI",
        help="http(s)://… (a tracking server), a folder or file://… (a file store); a "
        "database store (sqlite://…) needs the full mlflow package",
    )  # fmt: skip


def run_import_mlflow(args: argparse.Namespace) -> int:
    from peftlab import mlflow_bridge  # imports MLflow only now

    with _client() as client:
        outcomes = mlflow_bridge.import_runs(
            client,
            args.tracking_uri,
            experiment=args.experiment,
            project=_project_ref(args.project),
            run_ids=args.run_id,
            artifacts=not args.no_artifacts,
        )
    return _report(outcomes, "no MLflow runs found")


def run_export_mlflow(args: argparse.Namespace) -> int:
    from peftlab import mlflow_bridge

    with _client() as client:
        outcomes = mlflow_bridge.export_runs(
            client, args.tracking_uri, args.run_ids, experiment=args.experiment
        )
    return _report(outcomes, "nothing to export")


def _project_ref(text: str | None) -> int | str | None:
    return int(text) if text and text.isdigit() else text


def _report(outcomes: list, nothing: str) -> int:
    for outcome in outcomes:
        print(outcome.line())
    if not outcomes:
        print(nothing)
    return 1 if any(outcome.problems for outcome in outcomes) else 0


def _sync_one(client: Client, path: Path) -> tuple[str, bool]:
    """(what happened, whether the file was sent and removed)."""
    try:
        held = spool.Spool.open(path)
    except spool.SpoolLocked:
        return "left alone: the script that writes it is still running and sends it itself", False
    except spool.SpoolError as error:
        return f"skipped: {error}", False
    if held.url != client.url:
        held.close()
        return f"skipped: for {held.url}, not {client.url} (set PEFTLAB_URL to send it)", False
    try:
        done = held.drain(client)
    except spool.SpoolError as error:
        held.close()
        return f"stopped: {error}", False
    return _drained_line(done), True


def _drained_line(done) -> str:
    parts = [f"run {done.run}: {done.points:,} points"]
    if done.artifacts:
        parts.append(f"{done.artifacts} artifact{'s' if done.artifacts > 1 else ''}")
    parts.append(
        f"finished {done.finished}"
        if done.finished
        else "no finish recorded (the script stopped first: the run stays running)"
    )
    line = ", ".join(parts) + " sent"
    for refused in done.skipped:
        line += f"\n  refused by the server: {refused}"
    return line


# --- peftlab sweep -----------------------------------------------------------


def _add_sweep(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser("sweep", help="launch and watch a sweep over methods and a grid")
    actions = sweep.add_subparsers(dest="action", required=True, metavar="ACTION")
    launch = actions.add_parser("launch", help="queue one run per method and grid point")
    _add_model_and_dataset(launch)
    launch.add_argument("--methods", required=True, help="comma-separated, e.g. lora,dora,ia3")
    launch.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="METHOD.FIELD=V1,V2",
        help="values to try, e.g. --grid lora.r=4,8,16 (repeatable)",
    )
    launch.add_argument(
        "--seeds",
        type=int,
        metavar="K",
        help="train each configuration K times (1-10), with seeds seed, seed+1, …; the "
        "compare page shows their mean ± 95%% interval",
    )
    _add_train_options(launch)
    launch.set_defaults(run=run_sweep_launch)
    watch = actions.add_parser("watch", help="follow a sweep's runs until all have ended")
    watch.add_argument("sweep_id", type=int, metavar="ID")
    _add_interval(watch)
    watch.set_defaults(run=run_sweep_watch)


def run_sweep_launch(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    grid = dict(_parse_grid(g) for g in args.grid)
    with _client() as client:
        dataset = resolve_dataset(client, args.dataset)
        sweep = client.launch_sweep(
            base_model=args.model,
            dataset=dataset["id"],
            methods=methods,
            grid=grid,
            train_config=_train_config(args),
            name=args.name or f"{', '.join(methods)} on {dataset.get('name', args.dataset)}",
            project=args.project,
            seeds=args.seeds,
            **_placement(args),
        )
        print(f"sweep {sweep['id']}: {len(sweep['runs'])} runs queued")
        for run in sweep["runs"]:
            print(
                f"  run {run['id']:<6} {run['method']:<10} {_compact(run['method_config'])}".rstrip()
            )
        print(client.page_url(sweep["url"]))
        return watch_sweep(client, sweep["id"], args.interval) if args.watch else 0


def run_sweep_watch(args: argparse.Namespace) -> int:
    with _client() as client:
        return watch_sweep(client, args.sweep_id, args.interval)


def _parse_grid(text: str) -> tuple[str, list]:
    key, raw = parse_assignment(text, "--grid", parse=False)
    values = [parse_value(part.strip()) for part in raw.split(",") if part.strip()]
    if "." not in key or not values:
        raise UsageError(f"--grid expects METHOD.FIELD=V1,V2 (e.g. lora.r=4,8), got {text!r}")
    return key, values


# --- arguments ---------------------------------------------------------------


def parse_assignment(text: str, option: str, *, parse: bool = True) -> tuple[str, Any]:
    """ "r=8" → ("r", 8); the value is parsed by `parse_value` unless parse=False."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"{option} expects FIELD=VALUE, got {text!r}")
    return key.strip(), parse_value(raw.strip()) if parse else raw.strip()


def parse_value(raw: str) -> Any:
    """A JSON number, true, false or null as itself, anything else as the string ("8" quoted
    stays a string): the server converts and checks each field against the method's schema."""
    try:
        value = json.loads(raw, parse_constant=_reject)
    except ValueError:
        return raw
    return value if value is None or isinstance(value, bool | int | float | str) else raw


def _reject(name: str) -> None:
    raise ValueError(name)  # NaN and Infinity are not JSON: keep them as strings


def _train_config(args: argparse.Namespace) -> dict:
    given = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "max_length": args.max_length,
        "eval_every": args.eval_every,
        "checkpoint_every": args.checkpoint_every,
    }
    return {key: value for key, value in given.items() if value is not None}


def resolve_dataset(client: Client, ref: str) -> dict:
    """An id as it is; otherwise the one dataset whose built-in key or exact name is ref."""
    if ref.isdigit():
        return {"id": int(ref)}
    datasets = list(client.datasets())
    matches = [d for d in datasets if d.get("builtin_key") == ref] or [
        d for d in datasets if d["name"] == ref
    ]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(
            f"--dataset {ref!r} names {len(matches)} datasets; pass one id: "
            + ", ".join(_dataset_label(d) for d in matches)
        )
    raise UsageError(
        f"no dataset {ref!r}; choose an id, key or name: "
        + ", ".join(_dataset_label(d) for d in datasets)
    )


def _dataset_label(dataset: dict) -> str:
    return f"{dataset['id']} ({dataset.get('builtin_key') or dataset['name']})"


# --- output ------------------------------------------------------------------

TABLE_COLUMNS = ("ID", "STATUS", "METHOD", "MODEL", "STEP", "EVAL_LOSS", "NAME")


def print_table(runs: Iterable[dict]) -> None:
    rows = [TABLE_COLUMNS] + [_table_row(run) for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())


def _steps(run: dict) -> str:
    """ "12/30"; a run that never said how many steps it has (trained elsewhere): "12"."""
    return f"{run['step']}/{run['total_steps']}" if run["total_steps"] else str(run["step"])


def _table_row(run: dict) -> tuple[str, ...]:
    return (
        str(run["id"]),
        run["status"],
        run["method"],
        run["base_model"],
        _steps(run),
        _number(_latest(run, "eval_loss")),
        run["name"],
    )


def _latest(run: dict, key: str) -> float | None:
    return (run.get("latest") or {}).get(key)


def _number(value: float | None) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) and math.isfinite(value) else "-"


def _compact(config: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in config.items())


# --- watching ----------------------------------------------------------------


def watch_run(client: Client, run_id: int, interval: float) -> int:
    """A progress bar until the run ends; 0 if it succeeded, 1 otherwise."""
    polls = client.watch(run_id, interval)
    run = next(polls)  # an unknown id fails here, before a bar is drawn
    # initial: steps done before we started watching do not count towards the rate
    with tqdm(unit="step", desc=f"run {run_id}", initial=run["step"], dynamic_ncols=True) as bar:
        try:
            for run in itertools.chain([run], polls):  # noqa: B020 (the last one is the result)
                _show(bar, run["step"], run["total_steps"], _postfix(run))
        except KeyboardInterrupt:
            bar.write(f"the run goes on; `peftlab runs cancel {run_id}` stops it")
            raise
    print(_result_line(run))
    return 0 if run["status"] == "succeeded" else 1


def _show(bar: tqdm, step: int, total: int, postfix: str) -> None:
    bar.total = total or None
    bar.n = step
    bar.set_postfix_str(postfix, refresh=False)
    bar.refresh()


def _postfix(run: dict) -> str:
    loss, eval_loss = _latest(run, "train_loss"), _latest(run, "eval_loss")
    return f"loss={_number(loss)} eval={_number(eval_loss)} {run['status']}"


def _result_line(run: dict) -> str:
    line = (
        f"run {run['id']} {run['status']} at step {_steps(run)}: "
        f"loss {_number(_latest(run, 'train_loss'))}, eval loss {_number(_latest(run, 'eval_loss'))}"
    )
    if run["status"] != "succeeded" and run.get("error"):
        line += f"\nerror: {run['error']}"
    return line


def watch_sweep(client: Client, sweep_id: int, interval: float) -> int:
    """One bar over all the runs' steps and a line as each run ends; 0 if all succeeded."""
    polls = client.watch_sweep(sweep_id, interval)
    sweep = next(polls)  # an unknown id fails here, before a bar is drawn
    reported: set[int] = set()
    with tqdm(unit="step", desc=f"sweep {sweep_id}", dynamic_ncols=True) as bar:
        for sweep in itertools.chain([sweep], polls):  # noqa: B020 (the last one is the result)
            for run in sweep["runs"]:
                if run["status"] in FINISHED_STATUSES and run["id"] not in reported:
                    reported.add(run["id"])
                    bar.write(_result_line(run))
            _show_sweep(bar, sweep["runs"])
    statuses = [run["status"] for run in sweep["runs"]]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses)))
    print(f"sweep {sweep_id}: {counts}")
    return 0 if all(s == "succeeded" for s in statuses) else 1


def _show_sweep(bar: tqdm, runs: list[dict]) -> None:
    total = sum(run["total_steps"] for run in runs)
    # A run that ended early (failed, cancelled) counts as done: nothing is left of it to wait for.
    done = sum(
        run["total_steps"] if run["status"] in FINISHED_STATUSES else run["step"] for run in runs
    )
    active = sum(run["status"] in ("queued", "running") for run in runs)
    _show(bar, done, total, f"{len(runs) - active}/{len(runs)} runs ended")


if __name__ == "__main__":
    sys.exit(main())
