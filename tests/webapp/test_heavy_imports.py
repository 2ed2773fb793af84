"""Two threads of a fresh web process asking for an estimate and a token preview at once:
both load transformers for the first time, and neither may fail. Without
webapp/experiments/heavy.py's lock this failed 6 times out of 6 here with "ImportError:
cannot import name 'AutoTokenizer' from 'transformers'" (a 500 on /runs/new/estimate/ in
the browser test)."""

import subprocess
import sys
import textwrap

from tests.conftest import save_tiny_qwen2

CHILD = textwrap.dedent(
    """
    import sys, threading
    import django
    django.setup()
    from webapp.experiments import estimates, token_preview

    errors, barrier = [], threading.Barrier(4)

    def go(i):
        barrier.wait()
        try:
            if i % 2:
                estimates.model_shape("tiny-llama")
            else:
                token_preview._tokenizer(sys.argv[1], i)
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(errors or "ok")
    sys.exit(1 if errors else 0)
    """
)


def test_first_estimate_and_token_preview_at_once_both_load_transformers(tmp_path):
    model = tmp_path / "qwen"
    save_tiny_qwen2(model)
    env = {"DJANGO_SETTINGS_MODULE": "webapp.settings", "PEFTLAB_VAR_DIR": str(tmp_path / "var")}
    import os

    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(model)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
