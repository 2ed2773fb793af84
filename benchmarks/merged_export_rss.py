"""The web process's memory while a merged SmolLM2 export is asked for and downloaded.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python benchmarks/merged_export_rss.py [--shard-size 200MB] [--rank 16]

A throwaway database on that server (created, migrated, dropped) and a throwaway var dir
(its artifacts/ is the file:// store). A child process loads SmolLM2-135M-Instruct, puts a
random LoRA adapter on it (no training: B is perturbed away from zero so the adapter moves
the logits) and saves the adapter and its logits on a fixed prompt; this process stores the
adapter as a succeeded run's. Then, as the web process, it asks for the merged model through
Django's test client (GET merged.zip queues the build), a second child runs the `export`
queue's task function (workers.exports.build_merged_export), and this process downloads the
zip, streamed from the store and hashed, to a file. A third child loads the unzipped model
with plain transformers and compares its logits with the adapter's.

It prints the web process's RSS before and after the request and at its peak during the
download, the worker's peak RSS, and the merged model's size. The goal (issue 15): the web
process's RSS does not grow by the model's size; the web never loads the model.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

MODEL = "smollm2-135m-instruct"
PROMPT_IDS = [1, 504, 3458, 314, 253, 6549, 2]
MB = 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shard-size", default="", help="PEFTLAB_MERGED_SHARD_SIZE (e.g. 200MB)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (q_proj, v_proj)")
    parser.add_argument("--make-adapter", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--build", type=int, metavar="EXPORT_ID", help=argparse.SUPPRESS)
    parser.add_argument("--check", metavar="DIR", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def rss_mb() -> float:
    """This process's resident set now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _django() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    import django

    django.setup()


# ---- the children ----------------------------------------------------------------------------


def make_adapter(directory: Path, rank: int) -> None:
    """Child: a random LoRA adapter on SmolLM2 and the adapted logits on PROMPT_IDS."""
    _django()
    import torch
    from django.conf import settings
    from safetensors.torch import save_file

    import peft_core
    from peft_core.catalogue import load_model

    model, _ = load_model(MODEL, "causal-lm", cache_dir=settings.MODEL_CACHE_DIR)
    model = peft_core.apply(model, peft_core.LoraConfig(r=rank, alpha=2 * rank))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
        logits = model.eval()(input_ids=torch.tensor([PROMPT_IDS])).logits
    peft_core.save_adapter(model, directory / "adapter", base_model_name_or_path=MODEL)
    save_file({"logits": logits.contiguous()}, directory / "expected.safetensors")


def build(export_id: int) -> None:
    """Child: the `export` queue's task function, as a worker runs it."""
    _django()
    from workers.exports import build_merged_export

    started = time.perf_counter()
    outcome = build_merged_export(export_id)
    took = time.perf_counter() - started
    print(json.dumps({"outcome": outcome, "seconds": took, "peak_rss_mb": peak_rss_mb()}))


def check(directory: Path) -> None:
    """Child: the unzipped merged model in plain transformers against the adapter's logits."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    expected = load_file(directory / "expected.safetensors")["logits"]
    model = AutoModelForCausalLM.from_pretrained(directory / "merged", local_files_only=True)
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([PROMPT_IDS])).logits
    print(json.dumps({"max_abs_diff": (logits - expected).abs().max().item()}))


def _child(*args: str, env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        env=env or os.environ.copy(),
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"child {args} failed:\n{result.stderr[-3000:]}")
    return result.stdout


# ---- the web process -------------------------------------------------------------------------


def _seed(adapter: Path):
    """A team, a member and a succeeded LoRA run holding the adapter's files."""
    from django.contrib.auth import get_user_model

    from webapp.accounts.models import Membership, Role, Team
    from webapp.experiments import leases
    from webapp.experiments.models import Dataset, Project, Run, RunStatus

    user = get_user_model().objects.create_user(username="bench")
    team = Team.objects.create(name="Bench")
    Membership.objects.create(team=team, user=user, role=Role.MEMBER)
    run = Run.objects.create(
        project=Project.objects.create(team=team, name="merged"),
        name="lora",
        created_by=user,
        base_model=MODEL,
        dataset=Dataset.objects.get(team=None, builtin_key="sample-instructions"),
        method="lora",
        method_config={"r": 16},
        train_config={"steps": 1},
        total_steps=1,
    )
    fence = leases.run_claim(run_id=run.id, worker="bench")
    for path in sorted(adapter.iterdir()):
        leases.artifact_store(
            run_id=run.id, fence=fence, kind="adapter", name=path.name, data=path.read_bytes()
        )
    Run.objects.filter(id=run.id).update(status=RunStatus.SUCCEEDED)
    return user, run


def _download(client, url: str, into: Path) -> tuple[int, float]:
    """Stream the zip to a file; its size and the web process's peak RSS while it streamed."""
    response = client.get(url)
    assert response.status_code == 200, response.status_code
    peak, size = rss_mb(), 0
    with into.open("wb") as out:
        for chunk in response.streaming_content:
            out.write(chunk)
            size += len(chunk)
            peak = max(peak, rss_mb())
    return size, peak


def main() -> None:
    args = parse_args()
    if args.make_adapter:
        return make_adapter(Path(args.make_adapter), args.rank)
    if args.build is not None:
        return build(args.build)
    if args.check:
        return check(Path(args.check))

    os.environ["CELERY_BROKER_URL"] = "filesystem://"  # the queued message is left unread
    if args.shard_size:
        os.environ["PEFTLAB_MERGED_SHARD_SIZE"] = args.shard_size
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _throwaway_pg import throwaway_database

    throwaway_database("merged")
    from django.conf import settings
    from django.test import Client
    from django.test.utils import setup_test_environment
    from django.urls import reverse

    from webapp.experiments.models import Artifact, MergedExport
    from webapp.experiments.store import store_delete

    work = Path(tempfile.mkdtemp(prefix="peftlab-bench-merged-"))
    _child("--make-adapter", str(work), "--rank", str(args.rank))
    user, run = _seed(work / "adapter")
    setup_test_environment()
    client = Client()
    client.force_login(user)
    url = reverse("run_merged_download", args=[run.id])
    client.get(reverse("run_detail", args=[run.id]))  # warm: templates, URL resolvers

    before = rss_mb()
    assert client.get(url).status_code == 302  # queued; the visitor goes back to the page
    after_request = rss_mb()
    export = MergedExport.objects.get(run=run)
    worker = json.loads(_child("--build", str(export.id)).strip().splitlines()[-1])
    assert worker["outcome"] == "ready", worker
    export.refresh_from_db()
    zip_bytes, peak = _download(client, url, work / "merged.zip")
    after_download = rss_mb()

    files = Artifact.objects.filter(run=run, kind="merged")
    shards = files.filter(name__endswith=".safetensors").count()
    with zipfile.ZipFile(work / "merged.zip") as archive:
        archive.extractall(work / "merged")
    logits = json.loads(_child("--check", str(work)).strip().splitlines()[-1])

    print(f"model: {MODEL}, LoRA r={args.rank} on q_proj and v_proj (random, not trained)")
    print(
        f"merged model: {export.size / MB:.1f} MiB in {files.count()} files "
        f"({shards} safetensors shard(s) of at most {settings.MERGED_SHARD_SIZE / 1e6:.0f} MB), "
        f"zip {zip_bytes / MB:.1f} MiB"
    )
    print(f"worker (separate process): built in {worker['seconds']:.1f} s, "
          f"peak RSS {worker['peak_rss_mb']:.0f} MiB")  # fmt: skip
    print(f"web RSS before the request:   {before:7.1f} MiB")
    print(f"web RSS after the request:    {after_request:7.1f} MiB ({after_request - before:+.1f})")
    print(f"web RSS peak during download: {peak:7.1f} MiB ({peak - before:+.1f})")
    print(
        f"web RSS after the download:   {after_download:7.1f} MiB ({after_download - before:+.1f})"
    )
    growth = max(after_request, peak, after_download) - before
    verdict = "met" if growth < export.size / MB / 10 else "missed"
    print(
        f"goal: the web's RSS does not grow by the model's size (met below a tenth of it): "
        f"+{growth:.1f} MiB for a {export.size / MB:.0f} MiB model "
        f"({growth / (export.size / MB):.1%}), {verdict}"
    )
    print(f"merged vs adapter logits (plain transformers): max |diff| {logits['max_abs_diff']:.2e}")
    store_delete(files.values_list("key", flat=True))  # ~0.5 GB in the var dir's store
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
