"""The app in a real browser: Debian's Chromium driven by Playwright (which never downloads a browser).

Uploads an example, reads the label, opens the attention tab, finds the head maps and picks a query
cell by clicking the grid. Screenshots of both tabs go to $EFFNETV2_SCREENSHOT_DIR (the committed
docs/screenshot_*.png come from `EFFNETV2_SCREENSHOT_DIR=docs python -m pytest tests/test_app_browser.py`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import app
from app_server import running_app
from effnetv2 import EfficientNetV2
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
        page.goto(url, wait_until="networkidle")
        yield page
        browser.close()


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
    assert page.locator("#classify-label .confidence-set").count() == app.TOP_K
    page.screenshot(path=str(shots / "screenshot_classify.png"), full_page=True)


def test_attention_tab(page, example, shots):
    page.get_by_role("tab", name="Attention").click()
    page.set_input_files("#attention-image input[type=file]", example)
    page.click("#attention-button")
    model = EfficientNetV2.from_pretrained(app.DEFAULT_MODEL)
    heads, (_, cols) = model.num_heads, feature_grid(model)
    maps = page.locator("#head-gallery img")
    maps.nth(heads).wait_for()  # one map per head, then their mean
    assert maps.count() == heads + 1
    text = page.inner_text("#head-gallery")
    assert "head 1" in text and f"head {heads}" in text and "mean" in text
    page.locator("#maths .katex").first.wait_for()  # the maths are typeset
    grid = page.locator("#grid-view img")
    box = grid.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.99, box["y"] + box["height"] * 0.01)  # top-right cell
    page.wait_for_function(f"() => document.querySelector('#query-col input').value === '{cols - 1}'")
    assert page.locator("#query-row input").input_value() == "0"
    assert page.locator("#query-mode input[value='cell']").is_checked()
    page.locator("#maths", has_text=f"the token at cell (0, {cols - 1})").wait_for()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(shots / "screenshot_attention.png"), full_page=True)


def test_example_clicks_run_the_model(page):
    """An example click fills the image and computes (a step of its own in the app's concurrency group)."""
    from effnetv2.inference import Predictor

    circle = str(Path(app.__file__).parent / "assets" / "examples" / "circle.png")
    expected = Predictor(app.DEFAULT_MODEL, backend="torch").predict([circle], top_k=1)[0][0][0]
    page.get_by_role("tab", name="Classify").click()
    page.locator("button.gallery-item:visible", has=page.locator("img[src$='/circle.png']")).click()
    page.locator("#classify-label [data-testid='label-output-value']", has_text=expected).wait_for()
    page.get_by_role("tab", name="Attention").click()  # the last test left a clicked cell as the query
    assert page.locator("#query-mode input[value='cell']").is_checked()
    page.locator("button.gallery-item:visible", has=page.locator("img[src$='/hexagon.png']")).click()
    page.locator("#maths", has_text="the pooled query").wait_for()
    assert page.locator("#query-mode input[value='pooled']").is_checked()
