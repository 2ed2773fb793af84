"""transformers (and torch with it), imported by the web process only when a page first
needs them, and then by one thread at a time.

transformers resolves its names lazily, importing submodules on first use; two threads of a
gunicorn worker that touch it for the first time at once can see a half-imported submodule
and fail with "ImportError: cannot import name 'AutoTokenizer' from 'transformers'"
(reproduced by tests/webapp/test_heavy_imports.py without this lock). Every web path that
loads them goes through `architecture()` or `transformers_ready()`.
"""

import threading
import time
from types import ModuleType

_lock = threading.Lock()
_ready = False
RETRIES = 50  # × 0.1 s
# The names the web's paths use: resolved here once, they are plain attributes afterwards.
NAMES = (
    "AutoConfig",
    "AutoTokenizer",
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "PretrainedConfig",
    "PreTrainedTokenizerBase",
)


def transformers_ready() -> None:
    global _ready
    if _ready:
        return
    with _lock:
        if _ready:
            return
        for attempt in range(RETRIES):
            try:
                import transformers

                for name in NAMES:
                    getattr(transformers, name)
                break
            except (ImportError, AttributeError):
                # A thread outside this lock (code that imports transformers for something
                # else) is half-way through the same submodule: wait for it, then again.
                if attempt == RETRIES - 1:
                    raise
                time.sleep(0.1)
        _ready = True


def architecture() -> ModuleType:
    """webapp/experiments/architecture.py (torch and transformers), imported once."""
    transformers_ready()
    with _lock:
        from webapp.experiments import architecture as module
    return module
