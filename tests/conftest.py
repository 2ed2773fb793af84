"""The fixed cast: alice (owner) and bob (member) and carol (viewer) of team Acme; mallory
owns team Umbrella. Nothing in the tests reaches a model hub."""

import importlib
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _services_are_real(request):
    """In CI (PEFTLAB_REQUIRE_SERVICES=1) the suite must run on PostgreSQL and Redis."""
    from django.conf import settings

    if not settings.REQUIRE_SERVICES:
        return
    engine = settings.DATABASES["default"]["ENGINE"]
    assert "postgresql" in engine, f"CI must test on PostgreSQL, settings use {engine}"
    assert settings.CELERY_BROKER_URL.startswith("redis://"), "CI must test on Redis"


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """The cast's passwords need not resist cracking in tests; PBKDF2 costs ~0.4 s each."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def leaves_every_app_migrated():
    """For tests that migrate back and forth: afterwards every app's latest migration is
    applied again, not only the app under test (going back can unapply the apps that depend
    on it, and every later test in the process would miss their tables)."""
    yield
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    left = executor.migration_plan(executor.loader.graph.leaf_nodes())
    assert not left, f"the test left migrations unapplied: {[m.name for m, _ in left]}"


@pytest.fixture
def builtin_datasets(db):
    """The rows the data migration creates (a transactional test flushes them away)."""
    from django.apps import apps

    migration = importlib.import_module("webapp.experiments.migrations.0002_builtin_datasets")
    migration.create_builtins(apps, None)
    from webapp.experiments.models import Dataset

    return {d.builtin_key: d for d in Dataset.objects.filter(team=None)}


def _member(username: str, team, role: str):
    from django.contrib.auth import get_user_model

    from webapp.accounts.models import Membership

    user = get_user_model().objects.create_user(username=username, password=f"{username}-pw-9")
    Membership.objects.create(team=team, user=user, role=role)
    return user


@pytest.fixture
def catalogue_models(db):
    """The bundled models' registry rows (a transactional test flushes them away)."""
    migration = importlib.import_module("webapp.registry.migrations.0002_catalogue_models")
    from django.apps import apps

    migration.create_catalogue_rows(apps, None)


@pytest.fixture
def cast(db, builtin_datasets, catalogue_models):
    from types import SimpleNamespace

    from webapp.accounts.models import Role, Team
    from webapp.experiments.models import Project

    acme, umbrella = Team.objects.create(name="Acme"), Team.objects.create(name="Umbrella")
    return SimpleNamespace(
        acme=acme,
        umbrella=umbrella,
        acme_project=Project.objects.create(team=acme, name="Default"),
        umbrella_project=Project.objects.create(team=umbrella, name="Default"),
        alice=_member("alice", acme, Role.OWNER),
        bob=_member("bob", acme, Role.MEMBER),
        carol=_member("carol", acme, Role.VIEWER),
        mallory=_member("mallory", umbrella, Role.OWNER),
        datasets=builtin_datasets,
    )


@pytest.fixture
def make_run(cast):
    """make_run(**fields): a Run row of Acme (not enqueued), for pages that only read it."""
    from webapp.experiments.models import Run

    def make(**fields):
        defaults = {
            "project": cast.acme_project,
            "name": "lora-r8",
            "created_by": cast.alice,
            "base_model": "tiny-llama",
            "dataset": cast.datasets["sample-instructions"],
            "method": "lora",
            "method_config": {"r": 8},
            "train_config": {"steps": 5},
            "total_steps": 5,
        }
        return Run.objects.create(**{**defaults, **fields})

    return make


@pytest.fixture
def published():
    """The (task name, args) of every message Celery publishes, on whatever broker is set."""
    from celery.signals import before_task_publish

    sent = []

    def record(sender=None, body=None, **_):
        sent.append((sender, tuple(body[0])))

    before_task_publish.connect(record, weak=False)
    yield sent
    before_task_publish.disconnect(record)


@pytest.fixture(autouse=True)
def _lease_thread_quiet(request, settings):
    """In-process runs live in a test's open transaction, which the lease thread (a
    connection of its own) cannot see: it would find the run gone and stop the training.
    Tests on committed rows (transaction=True) keep the real cadence."""
    marker = request.node.get_closest_marker("django_db")
    if not (marker and marker.kwargs.get("transaction")):
        settings.RUN_HEARTBEAT_EVERY_S = 3600


def save_tiny_qwen2(directory, *, chat_template: bool = True) -> None:
    """A seeded random 2-layer Qwen2 (grouped-query attention) with the byte-level tokenizer,
    saved in Hugging Face layout: what a team's own model directory looks like."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from peft_core.catalogue import build_byte_tokenizer

    config = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tokenizer = build_byte_tokenizer()
    if chat_template:
        tokenizer.chat_template = (
            "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        )
    tokenizer.model_max_length = 256
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    """An allowed model root holding my-qwen, a tiny Qwen2 of a team's own (built once)."""
    root = tmp_path_factory.mktemp("models")
    save_tiny_qwen2(root / "my-qwen")
    return root


@pytest.fixture
def allowed_root(settings, model_root):
    settings.MODEL_ROOTS = [model_root]
    return model_root


@pytest.fixture
def adapter_run(make_run):
    """adapter_run(**fields): a succeeded Acme run holding a small adapter (config + weights,
    as database chunks) of `adapter_version` (default 1); adapter_run.add(run, version=2)
    stores another version."""
    from webapp.experiments.models import RunStatus

    def make(*, weights: bytes = b"w" * 300, adapter_version: int = 1, **fields):
        fields = {"status": RunStatus.SUCCEEDED, "summary": {"eval_loss": 1.25}, **fields}
        run = make_run(**fields)
        add_adapter(run, weights=weights, version=adapter_version)
        return run

    make.add = add_adapter
    return make


def add_adapter(run, *, weights: bytes = b"w" * 300, version: int = 1) -> dict[str, bytes]:
    """Store an adapter version on the run: {file name: bytes}."""
    from webapp.experiments.artifacts import artifact_insert

    files = {
        "adapter_config.json": b'{"peft_type": "LORA", "r": 8}',
        "adapter_model.safetensors": weights,
    }
    for name, data in files.items():
        artifact_insert(run_id=run.id, kind="adapter", name=name, data=data, version=version)
    return files
