"""The app in a real browser: Debian's Chromium driven by Playwright (which never downloads a browser).

Uploads an example, reads the label, opens the attention tab, checks the attribution maps (legible, in
view without scrolling), the faithfulness words and the bar chart, switches views, and picks a query
cell by clicking the grid. Screenshots of both tabs go to $EFFNETV2_SCREENSHOT_DIR (the committed
docs/screenshot_*.png come from `EFFNETV2_SCREENSHOT_DIR=docs python -m pytest tests/test_app_browser.py`).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

import app
from app_server import running_app
from effnetv2 import EfficientNetV2
from effnetv2 import viz
from effnetv2.viz import feature_grid

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


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("app") / "app.log") as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url, wait_until="load")  # not "networkidle": the page keeps a connection to the server open
        page.locator("#model-header").wait_for()
        yield page
        browser.close()


def settle(page) -> None:
    """Wait until every picture on the page has loaded (before a screenshot)."""
    page.wait_for_function("() => [...document.images].every(image => image.complete)")


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("EFFNETV2_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def example():
    return str(Path(app.__file__).parent / "assets" / "examples" / "star.png")


def test_classify_tab(page, example, shots):
    assert "EfficientNetV2-" in page.inner_text("#model-header")
    page.set_input_files("#classify-image input[type=file]", example)
    page.click("#classify-button")
    top = page.locator("#classify-label [data-testid='label-output-value']")  # the best label
    top.wait_for()
    from effnetv2.inference import Predictor

    expected = Predictor(app.DEFAULT_MODEL, backend="torch").predict([example], top_k=1)[0][0][0]
    assert top.inner_text().strip() == expected  # what the model itself says of this image
    assert page.locator("#classify-label .confidence-set").count() == 5  # README: the top-5 labels
    page.screenshot(path=str(shots / "screenshot_classify.png"), full_page=True)


def _check_gallery_is_legible(page, gallery: str, count: int) -> None:
    """``count`` pictures in the gallery, colour-bar labels drawn >= 10 px on screen, no caption cut off."""
    maps = page.locator(f"{gallery} img")
    maps.nth(count - 1).wait_for()
    assert maps.count() == count
    page.wait_for_function(f"() => [...document.querySelectorAll('{gallery} img')].every(i => i.complete && i.naturalWidth)")
    scales = page.eval_on_selector_all(f"{gallery} img", "imgs => imgs.map(i => Math.min(i.clientWidth / i.naturalWidth, i.clientHeight / i.naturalHeight))")
    assert min(scales) * viz.TICK_FONT_PX >= 10, f"tick labels drawn at {min(scales) * viz.TICK_FONT_PX:.1f} px"
    cut = page.eval_on_selector_all(f"{gallery} .caption-label",
                                    "els => els.filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)")
    assert not cut, f"captions cut off: {cut}"


def test_image_given_in_one_tab_is_in_the_other(page):
    """test_classify_tab uploaded the star in the Classify tab."""
    page.get_by_role("tab", name="Attention").click()
    page.locator("#attention-image img").wait_for()


def test_attention_tab(page, example, shots):
    page.get_by_role("tab", name="Attention").click()
    page.set_input_files("#attention-image input[type=file]", example)
    assert not page.locator("#query-row").is_visible()  # the cell inputs only show for a clicked cell
    page.click("#attention-button")
    model = EfficientNetV2.from_pretrained(app.DEFAULT_MODEL)
    heads, (_, cols) = model.num_heads, feature_grid(model)
    _check_gallery_is_legible(page, "#attribution-gallery", heads + 1)  # the default view: what heads add
    text = page.inner_text("#attribution-gallery")
    assert "head 1: +" in text or "head 1: -" in text
    assert "all heads" in text and "towards star" in text
    page.locator("#view-choice", has_text="what each head adds to star").wait_for()
    faithfulness = page.locator("#faithfulness", has_text="Why star?")
    faithfulness.wait_for()
    text = faithfulness.inner_text()  # "drops P(star) from 1.000 to 0.997", or "leaves" when it saturates
    assert "random map" in text and re.search(r"ranks first (drops|leaves) P\(star\)", text)
    page.locator("#head-totals svg, #head-totals canvas").first.wait_for()  # the bar chart is drawn
    settle(page)
    page.screenshot(path=str(shots / "screenshot_explain.png"))  # the first screen, as a visitor sees it
    page.get_by_label("Grad-CAM against the attribution (slider)").check()
    page.locator("#gradcam-slider img").first.wait_for()
    page.get_by_label("where each head looks").check()
    _check_gallery_is_legible(page, "#head-gallery", heads + 1)
    text = page.inner_text("#head-gallery")
    assert "head 1" in text and f"head {heads}" in text and "mean" in text
    page.locator("#maths .katex").first.wait_for()  # the maths are typeset
    grid = page.locator("#grid-view img")
    grid.scroll_into_view_if_needed()
    box = grid.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.95, box["y"] + box["height"] * 0.05)  # top-right cell
    page.wait_for_function(f"() => document.querySelector('#query-col input')?.value === '{cols - 1}'")  # shown now
    assert page.locator("#query-row input").input_value() == "0"
    assert page.locator("#query-mode input[value='cell']").is_checked()
    page.locator("#maths", has_text=f"the token at cell (0, {cols - 1})").wait_for()
    settle(page)
    page.screenshot(path=str(shots / "screenshot_attention.png"), full_page=True)


def test_example_clicks_run_the_model(page):
    """An example click fills the image and computes (a step of its own in the app's concurrency group);
    the unsure note follows the answer: shown for a photo, gone again for a shape."""
    from effnetv2.inference import Predictor

    circle = str(Path(app.__file__).parent / "assets" / "examples" / "circle.png")
    expected = Predictor(app.DEFAULT_MODEL, backend="torch").predict([circle], top_k=1)[0][0][0]
    page.get_by_role("tab", name="Classify").click()
    page.locator("button.gallery-item:visible", has=page.locator("img[src$='/photo_coffee.jpg']")).click()
    page.locator("#classify-note", has_text="This model knows only 5 classes: circle, hexagon").wait_for()
    page.locator("button.gallery-item:visible", has=page.locator("img[src$='/circle.png']")).click()
    page.locator("#classify-label [data-testid='label-output-value']", has_text=expected).wait_for()
    # The note is a step after the label: wait for it to go (a sure answer gets none), or time out.
    page.wait_for_function("() => !document.querySelector('#classify-note').innerText.trim()")
    page.get_by_role("tab", name="Attention").click()  # the last test left a clicked cell as the query
    assert page.locator("#query-mode input[value='cell']").is_checked()
    page.locator("button.gallery-item:visible", has=page.locator("img[src$='/hexagon.png']")).click()
    page.locator("#maths", has_text="the pooled query").wait_for()
    assert page.locator("#query-mode input[value='pooled']").is_checked()
    page.locator("#faithfulness", has_text="Why hexagon?").wait_for()  # and explains the class


def test_after_an_example_click_the_maps_fit_the_screen(page, shots):
    """At 1280x900 the maps are in view without scrolling; a photo gets the "only five shapes" note."""
    page.get_by_role("tab", name="Attention").click()
    page.get_by_label("what each head adds to").check()
    page.evaluate("window.scrollTo(0, 0)")
    photo = page.locator("button.gallery-item:visible", has=page.locator("img[src$='/photo_cat.jpg']"))
    photo.click()
    page.locator("#faithfulness", has_text="This model knows only 5 classes").wait_for()
    page.evaluate("window.scrollTo(0, 0)")
    last = page.locator("#attribution-gallery img").last.bounding_box()
    assert last["y"] + last["height"] <= 900, f"the last map ends at {last['y'] + last['height']:.0f} px"
    settle(page)
    page.screenshot(path=str(shots / "screenshot_photo.png"))
