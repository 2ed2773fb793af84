"""Browser tests: Playwright driving Debian's Chromium against pytest-django's live server."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from webapp.experiments import queue

CHROMIUM = Path("/usr/bin/chromium")
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # Playwright's sync API runs a loop


@pytest.fixture(scope="session")
def browser():
    from django.conf import settings

    if not CHROMIUM.exists():
        if settings.REQUIRE_SERVICES:
            pytest.fail("CI needs Chromium for the e2e tests: apt-get install chromium")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.dialogs = []
    page.answer_dialogs = "dismiss"  # a test that means to confirm sets "accept"

    def answer(dialog) -> None:
        page.dialogs.append(dialog.message)
        dialog.accept() if page.answer_dialogs == "accept" else dialog.dismiss()

    page.on("dialog", answer)
    yield page
    context.close()


def log_in(page, live_server, username: str, password: str) -> None:
    page.goto(f"{live_server.url}/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")


# The run queues `make run`'s worker serves on a CPU box, then the playground's and exports'.
QUEUES = (*queue.worker_queues("any", 2), "playground", "export")


@pytest.fixture
def start_worker(tmp_path):
    """start_worker(): a Celery worker process consuming every queue, as `make run` starts it;
    stopped at the end. Started on demand, so a page can first show the sweep all queued."""
    from django.conf import settings

    from tests.workers.test_celery_worker import _worker_env
    from webapp.celery import app as celery_app

    with celery_app.connection_for_write() as conn:
        for queue in QUEUES:
            conn.default_channel.queue_declare(queue, durable=True, auto_delete=False)
            conn.default_channel.queue_purge(queue)
    processes = []

    def start():
        log_path = tmp_path / "worker.log"
        command = [sys.executable, "-m", "celery", "-A", "webapp", "worker"]
        command += ["-Q", ",".join(QUEUES), "--concurrency", "1"]
        command += ["--without-gossip", "--without-mingle", "-l", "info"]
        with log_path.open("w") as log:
            process = subprocess.Popen(
                command,
                env=_worker_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=settings.BASE_DIR,
            )
        process.log_path = log_path
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def watched(page):
    """The page, with every console error or warning and uncaught exception in page.problems."""
    from tests.e2e.test_csp import REPORT_VIOLATIONS, _is_problem

    page.problems = []
    page.add_init_script(REPORT_VIOLATIONS)
    page.on("console", lambda m: _is_problem(m) and page.problems.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda exc: page.problems.append(f"exception: {exc}"))
    return page
