"""A run's lineage (Run.lineage): what it was trained with and where, recorded by the worker
that claims it (workers/system.py). The keys and how the pages name them are written once
here; the run page lists them in this order, the compare page highlights those that differ.
"""

from webapp.experiments.leases import StaleFenceError, owned

LINEAGE_FIELDS = (
    ("python", "Python"),
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("peft_core", "peft_core (peftlab)"),
    ("cuda", "CUDA (torch built for)"),
    ("driver", "NVIDIA driver"),
    ("git_sha", "Code (git commit)"),
    ("gpu", "GPU"),
    ("gpu_count", "GPU count"),
    ("devices", "Devices (processes)"),
    ("host", "Host"),
    ("seed", "Seed"),
    ("base_model", "Base model"),
    ("base_source", "Base model source"),
    ("base_revision", "Base model revision"),
    ("base_sha256", "Base model content sha256"),
    ("dataset_sha256", "Dataset sha256"),
    ("dataset_file_sha256", "Dataset rows file sha256"),
)
LABELS = dict(LINEAGE_FIELDS)
# What a share link does not show: where the team's machines are.
PRIVATE_FIELDS = ("host",)


def public_lineage(lineage: dict) -> dict:
    """The lineage as a share link shows it, without the private fields."""
    return {key: value for key, value in lineage.items() if key not in PRIVATE_FIELDS}


def lineage_keys(lineages: list[dict]) -> list[str]:
    """The keys any of `lineages` holds: the known ones in their order, then any others."""
    present = {key for lineage in lineages for key in lineage}
    known = [key for key, _ in LINEAGE_FIELDS if key in present]
    return known + sorted(present - set(LABELS))


def lineage_items(lineage: dict) -> list[tuple[str, object]]:
    """(label, value) pairs of one run's lineage, for the run page."""
    return [(LABELS.get(key, key), lineage[key]) for key in lineage_keys([lineage])]


def run_lineage_record(*, run_id: int, fence: int, lineage: dict) -> None:
    """Record what the run trains with and where, under the claim's fence (as leases.py's
    writes are): a resumed run's lineage is that of the attempt that resumed it."""
    if not owned(run_id, fence).update(lineage=lineage):
        raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
