"""Browser tests: Playwright driving Debian's Chromium against pytest-django's live server."""

import os
from pathlib import Path

import pytest

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
