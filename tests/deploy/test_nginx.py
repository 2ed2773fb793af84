"""deploy/nginx.conf read against the app and docker-compose.yml (body caps, paths, ports),
then run for real (the system's nginx, local ports) in front of gunicorn as bin/serve starts
it: 12 clients sending bodies one byte a second do not hold up /health/, and the static files
come compressed under hashed names, cached for a year. The script that does it,
benchmarks/slow_bodies.py, also shows gunicorn alone under the same attack."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.urls import reverse

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "slow_bodies.py"
CONF = (ROOT / "deploy" / "nginx.conf").read_text()
SERVICES = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def body_cap(location: str | None) -> int:
    """client_max_body_size in bytes: of `location = …` (exact), or the http block's."""
    if location is None:
        block = CONF.split("server {")[0]
    else:
        block = CONF.split(f"location = {location} {{")[1].split("}")[0]
    number, unit = re.search(r"client_max_body_size (\d+)([kmg]?);", block).groups()
    return int(number) * UNITS[unit]


def test_every_upload_endpoint_gets_its_cap_and_the_rest_a_small_one():
    datasets = [reverse("dataset_upload"), reverse("api-datasets")]
    adapters = [reverse("adapter_upload"), reverse("api-adapter-upload")]
    for path in datasets:
        assert settings.DATASET_MAX_BYTES < body_cap(path) < settings.DATASET_MAX_BYTES * 1.01
    for path in adapters:
        assert settings.ADAPTER_MAX_BYTES < body_cap(path) < settings.ADAPTER_MAX_BYTES * 1.01
    # The API's JSON bodies (a metrics batch) fit; nothing else gets more than a few MiB.
    assert settings.DATA_UPLOAD_MAX_MEMORY_SIZE < body_cap(None) <= 8 * 1024**2
    assert len(re.findall(r"location = ", CONF)) == len(datasets + adapters)
    # A run's uploads (POST /api/v1/runs/<id>/artifacts/): one pattern for every run.
    pattern, block = re.search(r"location ~ (\S+) \{([^}]*)\}", CONF).groups()
    assert re.fullmatch(pattern.strip("^$"), reverse("api-run-artifacts", args=[42]))
    number, unit = re.search(r"client_max_body_size (\d+)([kmg]?);", block).groups()
    cap = settings.RUN_FILE_MAX_BYTES
    assert cap + 1024**2 < int(number) * UNITS[unit] < cap * 1.01
    assert "proxy_request_buffering on;" in CONF
    assert re.search(r"client_body_timeout \d+s;", CONF)
    assert re.search(r"client_header_timeout \d+s;", CONF)


def test_compose_puts_the_proxy_in_front_of_web():
    web, proxy = SERVICES["web"], SERVICES["proxy"]
    assert "ports" not in web and proxy["ports"] == ["${PEFTLAB_HTTP_PORT:-8000}:80"]
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+(-alpine)?", proxy["image"])  # a pinned tag
    assert "listen 80;" in CONF
    bind = re.search(r"gunicorn webapp.wsgi --bind 0.0.0.0:(\d+) ", web["command"][2]).group(1)
    assert f"server web:{bind};" in CONF
    assert web["command"][2].startswith("python manage.py collectstatic --noinput")
    env = web["environment"]
    assert env["PEFTLAB_BEHIND_PROXY"] == env["PEFTLAB_STATIC_COLLECTED"] == "1"
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1)[::-1] for volume in proxy["volumes"])
    assert mounts["/etc/nginx/nginx.conf"] == "./deploy/nginx.conf"
    assert "include /etc/nginx/peftlab_proxy.conf;" in CONF
    assert mounts["/etc/nginx/peftlab_proxy.conf"] == "./deploy/peftlab_proxy.conf"
    # The volume web collects into (STATIC_ROOT under the image's PEFTLAB_VAR_DIR) is the one
    # nginx serves /static/ from.
    var_dir = re.search(r"PEFTLAB_VAR_DIR=(\S+)", (ROOT / "Dockerfile").read_text()).group(1)
    static = next(v for v in web["volumes"] if v.endswith(f":{var_dir}/static"))
    alias = re.search(r"location /static/ \{\s+alias (\S+)/;", CONF).group(1)
    assert mounts[alias] == static.split(":")[0]
    assert settings.STATIC_URL == "/static/"


@pytest.fixture(scope="module")
def figures() -> dict:
    """Both sides: gunicorn alone (its figures under attack vary, see RELIABILITY.md; only its
    static files are checked here) and behind nginx."""
    if shutil.which("nginx") is None:
        if settings.REQUIRE_SERVICES:
            pytest.fail("CI needs nginx for the proxy's test: apt-get install nginx-light")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    command = [sys.executable, str(SCRIPT), "--wait", "3", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def behind_nginx(figures) -> dict:
    return figures["nginx"]


def test_slow_bodies_do_not_hold_up_health_behind_nginx(behind_nginx):
    # The attack was in place the whole time: all 12 connections still sending, unanswered.
    assert behind_nginx["slow_bodies_still_open"] == 12
    # Every /health/ answered (each was given 3 s; the benchmark prints the times).
    assert behind_nginx["answered"] == behind_nginx["asked"] == 5


def test_a_form_post_passes_the_csrf_origin_check_through_nginx(figures):
    # nginx passes the Host header with its port ($http_host): Django compares it with Origin.
    assert figures["nginx"]["form_post"] == figures["gunicorn"]["form_post"] == 302


def test_static_files_are_compressed_and_cached_for_a_year(behind_nginx):
    static = behind_nginx["static"]
    assert static["status"] == 200
    assert static["url"].startswith("/static/plotly/plotly.min.") and static["url"] != (
        "/static/plotly/plotly.min.js"
    )
    assert static["content_encoding"] == "gzip"
    plotly = Path(settings.STATICFILES_DIRS[1][1]) / "plotly.min.js"
    assert static["bytes_sent"] < plotly.stat().st_size / 2
    assert static["cache_control"] == "public, max-age=31536000, immutable"


def test_without_a_proxy_whitenoise_sends_them_so_too(figures):
    """`make run` without nginx: collected static files, gzipped and immutable from whitenoise."""
    static = figures["gunicorn"]["static"]
    assert static["status"] == 200 and static["url"] == figures["nginx"]["static"]["url"]
    assert static["content_encoding"] == "gzip"
    assert static["bytes_sent"] == figures["nginx"]["static"]["bytes_sent"]
    assert "immutable" in static["cache_control"] and "max-age=315360000" in static["cache_control"]
