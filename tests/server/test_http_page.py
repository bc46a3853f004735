"""The translate page at / in real headless Chromium (Debian's chromium + chromium-driver): it loads the
language pair from /languages, translates a sentence, and hovering a target word highlights the source
word the model aligned it with. NMT_PAGE_SCREENSHOT=path keeps a screenshot there (docs/http-page.png)."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import read_lines

from nmt.decoding import DecodeOptions

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install "
                                       "chromium chromium-driver; .ci/run installs them)")
TEXT = read_lines("test_2016_flickr", "en", 1)[0]


@pytest.fixture(scope="module")
def page_server(tiny_bundle):
    from serve.engine.translator import EngineConfig, Translator
    from serve.server.http_api import HttpState, build_app, remove_files
    from serve.server.http_server import HttpServer
    from serve.server.metrics import Metrics
    from serve.server.registry import ModelRegistry

    translator = Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu"))
    registry = ModelRegistry(metrics=Metrics())
    registry.add(translator)
    state = HttpState(registry, metrics=registry.metrics or Metrics())
    http = HttpServer(build_app(state), "127.0.0.1", 0, grace=1)
    port = http.start()
    yield f"http://127.0.0.1:{port}", translator
    http.stop(1)
    registry.close(1)
    remove_files(state)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_translates_and_shows_the_alignment_on_hover(page_server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, translator = page_server
    browser.get(url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "target")).options) > 0)
    assert Select(browser.find_element(By.ID, "source")).first_selected_option.get_attribute("value") == "en"
    assert [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "target")).options] == ["de"]

    box = browser.find_element(By.ID, "text")
    box.clear()
    box.send_keys(TEXT)
    browser.find_element(By.ID, "translate").click()
    wait.until(lambda d: d.find_element(By.ID, "result").text.strip())
    # The page asks for 2 alternatives: a beam of 4 (serve.server.http_api.ALTERNATIVES_BEAM), 3 best.
    (want,) = translator.translate([TEXT], DecodeOptions(beam_size=4, n_best=3))
    assert browser.find_element(By.ID, "result").text == want.text
    shown = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#alternatives-list li")]
    assert shown == [h.text for h in want.hypotheses[1:] if h.text != want.text]
    assert browser.find_element(By.ID, "status").text == ""

    targets = browser.find_elements(By.CSS_SELECTOR, "#alignment .tgt .word")
    sources = browser.find_elements(By.CSS_SELECTOR, "#alignment .src .word")
    assert [t.text for t in targets] == want.text.split()
    assert [s.text for s in sources] == TEXT.split()
    word = next(t for t in targets if t.get_attribute("data-source"))
    ActionChains(browser).move_to_element(word).perform()
    linked = {int(i) for i in word.get_attribute("data-source").split()}
    lit = {i for i, s in enumerate(sources) if "hl" in s.get_attribute("class").split()}
    assert lit == linked
    shot = os.environ.get("NMT_PAGE_SCREENSHOT") or str(tmp_path / "page.png")
    assert browser.save_screenshot(shot)
    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
    assert not browser.find_elements(By.CSS_SELECTOR, "#alignment .src .word.hl")
