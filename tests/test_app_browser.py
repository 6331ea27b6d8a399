"""The app in a real browser, as a first-time visitor on a desktop (1366x900) and a phone (390x844):
Debian's Chromium driven by Playwright (which never downloads a browser). One app start for both sizes.

An example click and an upload each give the label and one large explanation picture in the first screen
with no further click; a new upload clears the old answer before the new one arrives; another class
redraws at once; no picture runs off the right edge; the ImageNet model, offline, says so once in a
visitor's words. Screenshots go to $EFFNETV2_SCREENSHOT_DIR (the committed docs/screenshot_*.png come
from `EFFNETV2_SCREENSHOT_DIR=docs python -m pytest tests/test_app_browser.py`).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

import app
from app_server import running_app
from effnetv2.inference import Predictor

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                               "(pip install -r requirements-dev.txt)")

# A closed network: keep Chromium from calling home at every start (see the machine notes).
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic", "--disable-default-apps", "--mute-audio"]
TIMEOUT_MS = 30_000
SIZES = {"desktop": {"width": 1366, "height": 900}, "phone": {"width": 390, "height": 844}}
EXAMPLES = Path(app.__file__).parent / "assets" / "examples"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """The app (offline, with an empty torch cache: the ImageNet weights cannot be had) and Chromium."""
    folder = tmp_path_factory.mktemp("app")
    with running_app(folder / "app.log", env={"TORCH_HOME": str(folder)}) as url, sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium, url
        chromium.close()


@pytest.fixture(params=list(SIZES))
def page(request, browser):
    chromium, url = browser
    page = chromium.new_page(viewport=SIZES[request.param])
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url, wait_until="load")  # not "networkidle": the page keeps a connection to the server open
    page.locator("#model-header", has_text="This model knows").wait_for()
    page.size = request.param
    yield page
    page.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("EFFNETV2_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def expected():
    """The label the bundled model itself gives each example."""
    predictor = Predictor(app.DEFAULT_MODEL, backend="torch")
    return {path.name: predictor.predict([str(path)], top_k=1)[0][0][0] for path in EXAMPLES.glob("*.png")}


def settle(page) -> None:
    """Wait until every picture on the page has loaded (before measuring or a screenshot), the lazy ones
    below the screen too."""
    page.evaluate("() => document.querySelectorAll('img[loading=lazy]').forEach(image => image.loading = 'eager')")
    page.wait_for_function("() => [...document.images].every(image => image.complete)")


def answered(page, label: str) -> None:
    """The answer for ``label`` is on the page: the sentence naming it, its picture loaded."""
    page.locator("#answer-sentence", has_text=re.compile(rf"\b{label}, \d+% sure")).wait_for()
    page.locator("#answer-picture img").wait_for()
    settle(page)


def check_first_screen(page, label: str) -> None:
    """The label, the sentence and the explanation picture are inside the viewport as it is (no scroll
    or click of the visitor's), the picture at least 320 px wide (desktop) or 90% of the width (phone)."""
    width, height = page.viewport_size["width"], page.viewport_size["height"]
    try:  # the page scrolls a phone to the answer once its picture is drawn
        page.wait_for_function("() => { const r = document.querySelector('#answer').getBoundingClientRect();"
                               " return r.top >= 0 && r.bottom <= innerHeight; }", timeout=5000)
    except sync_api.TimeoutError:
        pass  # the assertions below say where it is
    picture = page.locator("#answer-picture img").bounding_box()
    sentence = page.locator("#answer-sentence").bounding_box()
    assert picture["width"] >= (320 if page.size == "desktop" else 0.9 * width), picture
    for name, box in (("picture", picture), ("sentence", sentence)):
        assert box["y"] >= 0 and box["y"] + box["height"] <= height, (name, box, page.evaluate("scrollY"))
    top = page.locator("#answer-label [data-testid='label-output-value']")
    assert top.inner_text().strip() == label
    if page.size == "desktop":  # all of it in the first screen, with the label's bars
        assert page.evaluate("scrollY") == 0
        box = top.bounding_box()
        assert box["y"] + box["height"] <= height


def check_nothing_runs_off_the_right_edge(page) -> None:
    width = page.viewport_size["width"]
    wide = page.eval_on_selector_all(
        "img", f"imgs => imgs.filter(i => i.offsetParent && i.getBoundingClientRect().right > {width} + 1)"
               ".map(i => [i.closest('[id]')?.id, Math.round(i.getBoundingClientRect().right)])")
    assert not wide, f"pictures past the right edge at {width} px: {wide}"
    assert page.evaluate("document.documentElement.scrollWidth") <= width


def test_an_example_click_answers_in_the_first_screen(page, expected, shots):
    page.locator("button.gallery-item:visible", has=page.locator("img[src$='/star.png']")).click()
    answered(page, expected["star.png"])
    check_first_screen(page, expected["star.png"])
    check_nothing_runs_off_the_right_edge(page)
    page.screenshot(path=str(shots / f"screenshot_{page.size}.png"))


def test_an_upload_answers_and_the_next_one_clears_it_first(page, expected):
    """The sentence and picture are emptied before the next answer is drawn: a recorder of the answer's
    text sees the old answer, nothing (a progress timer aside), then the new one."""
    page.set_input_files("#image input[type=file]", str(EXAMPLES / "star.png"))
    answered(page, expected["star.png"])
    check_first_screen(page, expected["star.png"])
    page.evaluate("""() => { window.seen = [];
        const record = () => window.seen.push([document.querySelector('#answer-sentence').innerText.trim(),
                                               !!document.querySelector('#answer-picture img')]);
        new MutationObserver(record).observe(document.querySelector('#answer'),
                                             {subtree: true, childList: true, characterData: true}); }""")
    page.set_input_files("#image input[type=file]", str(EXAMPLES / "circle.png"))
    answered(page, expected["circle.png"])
    check_first_screen(page, expected["circle.png"])
    seen = page.evaluate("window.seen")
    first_new = next(i for i, (text, _) in enumerate(seen) if f"{expected['circle.png']}, " in text)
    assert any("% sure" not in text and not picture for text, picture in seen[:first_new]), seen  # the timer aside


def test_another_class_redraws_the_answer_without_a_button(page, expected):
    page.locator("button.gallery-item:visible", has=page.locator("img[src$='/star.png']")).click()
    answered(page, expected["star.png"])
    before = page.locator("#answer-picture img").get_attribute("src")
    page.locator("button.label-wrap", has_text="How the attention works").click()
    page.locator("#faithfulness", has_text="Why star?").wait_for()
    page.locator("#class-choice input").click()
    page.get_by_role("option", name="square", exact=True).click()
    page.locator("#answer-sentence", has_text=re.compile(r"\bsquare, \d+% sure")).wait_for()
    page.wait_for_function(f"() => document.querySelector('#answer-picture img')?.src !== {before!r}")
    page.locator("#faithfulness", has_text="Why square?").wait_for()  # the sections follow


def test_the_sections_below_fit_the_screen(page, expected, shots):
    """Opened, the sections show each head's map, the table and the playground, none past the right edge;
    a click on the grid picture draws that cell's attention on it."""
    page.locator("button.gallery-item:visible", has=page.locator("img[src$='/star.png']")).click()
    answered(page, expected["star.png"])
    for section in page.locator("button.label-wrap").all():
        section.click()
    page.locator("#faithfulness", has_text="Why star?").wait_for()
    page.locator("#attribution-gallery img").nth(8).wait_for(state="attached")
    page.locator("#play-gallery img").first.wait_for(state="attached")
    settle(page)  # the lazy pictures too
    page.locator("#maths .katex").first.wait_for()
    grid = page.locator("#grid-view img")
    grid.scroll_into_view_if_needed()
    before = grid.get_attribute("src")
    box = grid.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.25)  # below the picture's buttons
    page.locator("#maths", has_text="the token at cell (1, 5)").wait_for()
    page.wait_for_function(f"() => document.querySelector('#grid-view img')?.src !== {before!r}")
    for gallery in ("#attribution-gallery", "#head-gallery"):
        page.locator(f"{gallery} img").first.scroll_into_view_if_needed()
        columns = page.eval_on_selector_all(f"{gallery} img", "imgs => new Set(imgs.map(i => Math.round(i.getBoundingClientRect().x))).size")
        assert columns == (2 if page.size == "phone" else 5), (gallery, columns)
    settle(page)
    check_nothing_runs_off_the_right_edge(page)
    page.screenshot(path=str(shots / f"screenshot_{page.size}_sections.png"), full_page=True)


def test_imagenet_offline_says_so_once_in_a_visitors_words(page):
    page.locator("#model-choice input").click()
    page.get_by_role("option", name="ImageNet — EfficientNetV2-S, 1000 classes").click()
    toast = page.locator(".toast-body")
    toast.first.wait_for()
    page.wait_for_timeout(1500)  # a second message would be here by now
    texts = [text for text in toast.all_inner_texts() if text.strip()]
    assert len(texts) == 1, texts
    assert "could not be loaded" in texts[0] and "Shapes" in texts[0]
    assert "/" not in texts[0] and not re.search(r"\b[A-Z]{2,}_[A-Z_]+\b", texts[0]), texts[0]  # no path, no env var
    assert page.locator("#model-choice input").input_value().startswith("Shapes")  # the page stays on its model
