"""The web process serves pages and API calls without a model: importing the URLconf and the
page and API views in a fresh interpreter loads neither torch nor the workers, and no
module of the web side imports `workers` (it names tasks: webapp.experiments.queue)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LOADED = """
import json, os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
import django
django.setup()
import webapp.urls, webapp.experiments.views, webapp.api.views
from django.urls import get_resolver
get_resolver().url_patterns  # every view module the URLconf names
heavy = ("torch", "transformers", "safetensors", "workers")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""


def test_the_urlconf_and_views_load_without_torch_or_the_workers():
    result = subprocess.run(
        [sys.executable, "-c", LOADED],
        cwd=ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == []


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_web_module_imports_the_workers():
    offenders = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "webapp").rglob("*.py"))
        if any(name.split(".")[0] == "workers" for name in _imported_modules(path))
    ]
    assert offenders == []
