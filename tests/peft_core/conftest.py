"""Shared fixtures for peft_core tests: no model hub, fixed token ids."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / peft are imported

import pytest  # noqa: E402
import torch  # noqa: E402

VOCAB = 512


@pytest.fixture
def input_ids() -> torch.Tensor:
    """(2, 8) token ids in 1..VOCAB-1: no padding id, so seq-cls pools the last token."""
    return torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session", autouse=True)
def _services_are_real():
    """peft_core needs no database or broker: override the root conftest's Django check,
    so these tests also run with `-p no:django` and without Django settings."""


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One model cache for the session, never ~/.cache: the web's and workers' own
    (settings.MODEL_CACHE_DIR, the checkout's var/cache) where Django is set up, so SmolLM2
    is converted from its GGUF once per session, not once for them and once here."""
    try:
        from django.conf import settings

        return Path(settings.MODEL_CACHE_DIR)
    except Exception:  # run with -p no:django and no settings: a cache of their own
        return tmp_path_factory.mktemp("peftlab-cache")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads and lose a lot when CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
