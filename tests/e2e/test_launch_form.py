"""The launch form from the keyboard alone: Tab to each field, type, see the estimate follow,
Enter to launch; and the launch, list and run pages fit a phone's width without sideways
scrolling."""

import re

import pytest

from peft_core.methods import METHOD_LIST
from tests.e2e.conftest import CHROMIUM, log_in
from webapp.experiments.models import Run

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PHONE = {"width": 390, "height": 844}
FITS = "document.scrollingElement.scrollWidth <= window.innerWidth"


def _tab_to(page, element_id: str, limit: int = 60) -> None:
    """Press Tab until the element has the focus, as a keyboard user would."""
    for _ in range(limit):
        if page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"Tab never reached #{element_id}")


def _type(page, text: str) -> None:
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type(text)


def _estimate(page) -> str:
    return page.inner_text("#estimate")


def _wait_for_estimate_other_than(page, old: str) -> str:
    page.wait_for_function(
        "old => { const e = document.querySelector('#estimate');"
        " return e && !e.textContent.includes('Estimating') && e.innerText !== old; }",
        arg=old,
    )
    return _estimate(page)


def _errors(page) -> list[str]:
    """Console errors (a refused script or style under the CSP is one) and page exceptions."""
    errors: list[str] = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


def test_launch_from_the_keyboard_with_live_estimates(page, live_server, cast, tmp_path):
    base = live_server.url
    errors = _errors(page)
    log_in(page, live_server, "alice", "alice-pw-9")
    page.goto(f"{base}/runs/new/")
    first = _wait_for_estimate_other_than(page, "")
    assert "Trainable parameters" in first and "Peak memory (pre-flight)" in first

    _tab_to(page, "id_name")
    _type(page, "keyboard run")
    _tab_to(page, "id_base_model")
    page.keyboard.type("Tiny Llama")  # a select's type-ahead picks the option
    tiny = _wait_for_estimate_other_than(page, first)
    assert page.input_value("#id_base_model") == "tiny-llama"

    _tab_to(page, "id_r")
    _type(page, "32")
    wider = _wait_for_estimate_other_than(page, tiny)
    numbers = [re.search(r"Trainable parameters\s+([\d,]+)", t) for t in (tiny, wider)]
    small, large = (int(m.group(1).replace(",", "")) for m in numbers)
    assert large == 4 * small  # LoRA's parameters grow with r: 8 -> 32
    page.screenshot(path=str(tmp_path / "run_new_1280.png"), full_page=True)

    _tab_to(page, "id_steps")
    _type(page, "3")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/runs/\d+/$"))
    run = Run.objects.get(name="keyboard run")
    assert (run.base_model, run.method_config["r"], run.train_config["steps"]) == (
        "tiny-llama",
        32,
        3,
    )
    assert not errors


def test_the_method_swap_updates_the_estimate(page, live_server, cast):
    errors = _errors(page)
    log_in(page, live_server, "alice", "alice-pw-9")
    page.goto(f"{live_server.url}/runs/new/")
    lora = _wait_for_estimate_other_than(page, "")
    page.select_option("#id_method", "prefix")
    page.wait_for_selector("#id_num_virtual_tokens")
    prefix = _wait_for_estimate_other_than(page, lora)
    assert "Fix the form" not in prefix and "Trainable parameters" in prefix
    assert not errors


@pytest.fixture
def page_with_history_cache(browser):
    """A page in a Chromium that keeps pages for Back and Forward (the back/forward cache),
    as browsers do; Playwright turns that cache off by default."""
    with_cache = browser.browser_type.launch(
        executable_path=str(CHROMIUM),
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        ignore_default_args=["--disable-back-forward-cache"],
    )
    yield with_cache.new_context(viewport={"width": 1280, "height": 900}).new_page()
    with_cache.close()


def test_the_sweep_preset_keeps_what_was_typed_and_its_flash_shows_once(
    page_with_history_cache, live_server, cast
):
    """From the keyboard: type, choose the preset (a button of the form), the typed values
    stay; Enter in a field still launches. The launch's flash is not shown again when Back
    brings the page back."""
    page, base = page_with_history_cache, live_server.url
    errors = _errors(page)
    page.add_init_script("addEventListener('pageshow', (e) => { window.restored = e.persisted; })")
    log_in(page, live_server, "alice", "alice-pw-9")
    page.goto(f"{base}/sweeps/new/")
    page.fill("#id_steps", "7")
    _tab_to(page, "id_name")
    _type(page, "typed shoot-out")
    _tab_to(page, "id_base_model")
    page.keyboard.type("Tiny Llama")
    _tab_to(page, "preset")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    boxes = page.locator("input[name=methods]")
    assert boxes.count() == len(METHOD_LIST) and all(box.is_checked() for box in boxes.all())
    kept = [page.input_value(f"#id_{field}") for field in ("name", "base_model", "steps")]
    assert kept == ["typed shoot-out", "tiny-llama", "7"]
    assert "bottleneck.placement" in page.input_value("#id_grid")  # it was empty

    _tab_to(page, "id_name")
    page.keyboard.press("Enter")  # the form's default button launches
    page.wait_for_url(re.compile(r"/sweeps/\d+/$"))
    flash = page.locator(".flash-success")
    assert "“typed shoot-out” launched: 10 runs" in flash.inner_text()
    page.click("nav >> text=Runs")
    page.wait_for_url(f"{base}/")
    page.go_back(wait_until="commit")  # a page from the back/forward cache fires no load
    page.wait_for_selector("#sweep-runs")
    assert page.evaluate("window.restored")  # the page as it was left, flash and all
    assert page.locator(".flash-success").count() == 0
    assert not errors


@pytest.mark.parametrize("path", ["/runs/new/", "/", "/runs/{run}/", "/sweeps/new/", "/datasets/"])
def test_pages_fit_a_phone_without_sideways_scrolling(browser, live_server, cast, path, tmp_path):
    run = Run.objects.create(
        project=cast.acme_project,
        name="a run with a rather long name that should wrap on a phone",
        base_model="smollm2-135m-instruct",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
        train_config={"steps": 3},
        total_steps=3,
    )
    context = browser.new_context(viewport=PHONE)
    page = context.new_page()
    try:
        log_in(page, live_server, "alice", "alice-pw-9")
        page.goto(live_server.url + path.format(run=run.id))
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
        widths = page.evaluate("[document.scrollingElement.scrollWidth, window.innerWidth]")
        assert page.evaluate(FITS), f"{path}: content {widths[0]} px wide in a {widths[1]} px view"
    finally:
        context.close()
