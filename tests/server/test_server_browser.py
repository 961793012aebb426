"""The web page in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by
Selenium. Type a prompt, click Generate, watch the progress bar move, get the image; cancel a long job.

EDGEDIFF_UPDATE_DOCS=1 also writes the screenshot to docs/server.png.
"""

import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("selenium")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from server_helpers import LONG_JOB, decode_bytes, pixels  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get update && apt-get install -y chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_SECONDS = 60
PROMPT = "a large red circle on a blue background"
# records every width the bar's fill takes, in the page itself (a poll from here would miss short jobs)
WATCH_BAR = """
window.barWidths = [];
const fill = document.querySelector('#progress > div');
new MutationObserver(() => window.barWidths.push(parseFloat(fill.style.width) || 0))
  .observe(fill, {attributes: true, attributeFilter: ['style']});
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_SECONDS)
    yield driver
    driver.quit()


def _fill(driver, element_id: str, value) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def test_type_generate_watch_progress_get_the_image_then_cancel(browser, server, reference, tmp_path):
    wait = WebDriverWait(browser, WAIT_SECONDS)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("value") == "shipped")
    assert browser.find_element(By.ID, "steps").get_attribute("value") == "4"  # the model's defaults
    assert browser.find_element(By.ID, "width").get_attribute("step") == "16"  # and the multiple its sides take

    # 1. a 30-step image: the bar moves through the steps, previews show, the gallery gets the image
    browser.execute_script(WATCH_BAR)
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    _fill(browser, "steps", 30)
    _fill(browser, "seed", 7)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 1)
    widths = browser.execute_script("return window.barWidths")
    moving = [w for w in widths if 0 < w < 100]
    assert len(set(moving)) >= 2 and widths[-1] == 100, widths
    assert moving == sorted(moving)
    assert browser.find_element(By.ID, "status").text == "done: seed 7"
    link = browser.find_element(By.CSS_SELECTOR, "#gallery figure a")
    assert link.get_attribute("download") == "edgediff-7.png"
    caption = browser.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
    assert PROMPT in caption and "30 steps" in caption and "seed 7" in caption
    wait.until(lambda d: d.execute_script("return document.querySelector('#gallery img').naturalWidth") == 64)
    image = httpx.get(link.get_attribute("href"), timeout=10).content
    expected = reference(PROMPT, seed=7, num_inference_steps=30).images[0]
    assert np.array_equal(decode_bytes(image), pixels(expected))

    # 2. a second image for the gallery, then a long job cancelled part-way
    _fill(browser, "prompt", "a small green star at the top on a black background")
    _fill(browser, "steps", 4)
    _fill(browser, "seed", 3)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 2)

    side = LONG_JOB["size"].split("x")[0]
    _fill(browser, "width", side)
    _fill(browser, "height", side)
    _fill(browser, "steps", LONG_JOB["steps"])
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "progress").get_attribute("aria-valuenow") not in ("0", "100"))
    wait.until(lambda d: (d.find_element(By.ID, "preview").get_attribute("src") or "").startswith("data:image/png"))
    browser.find_element(By.ID, "cancel").click()
    clicked = time.monotonic()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("cancelled at step"))
    assert time.monotonic() - clicked < 5
    assert browser.find_element(By.ID, "generate").is_enabled()
    assert not browser.find_element(By.ID, "cancel").is_enabled()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 2
    server.wait_idle(5)

    shot = tmp_path / "server.png"
    assert browser.save_screenshot(str(shot))
    assert np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32).std() > 5.0  # not blank
    if os.environ.get("EDGEDIFF_UPDATE_DOCS"):
        shutil.copyfile(shot, ROOT / "docs" / "server.png")


def test_the_page_shows_a_refused_request(browser, server):
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, WAIT_SECONDS)
    wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("value") == "shipped")
    browser.find_element(By.ID, "prompt").send_keys("x")
    _fill(browser, "width", 100)  # the form's own check (step 8) stops this one before it is sent
    assert not browser.execute_script("return document.getElementById('controls').checkValidity()")
    _fill(browser, "width", 64)
    _fill(browser, "steps", 51)  # past the shipped model's LCM grid: only the server knows
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: "50 steps" in d.find_element(By.ID, "status").text)
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
    assert browser.find_element(By.ID, "generate").is_enabled()
