"""The playground page (/playground) in a real headless browser: Debian's chromium driven by selenium with the
system chromedriver (nothing downloaded). The page loads offline, asks for the API key, streams the unsteered
and the steered answer side by side, sends the slider's alpha, and draws the stored tune curve.

Without chromium and chromedriver on the machine the test is skipped with the reason, unless
JAILBREAK_ANTIDOTE_REQUIRE_BROWSER=1 (as in .ci/run, which installs them), where it fails instead.
Set JAILBREAK_ANTIDOTE_SCREENSHOTS=DIR to keep the screenshots (docs/images/playground.png comes from here)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_model
from serving import KEY, RunningServer

from jailbreak_antidote.generate import REFUSAL_MESSAGE
from jailbreak_antidote.probe import HarmProbe
from jailbreak_antidote.server import ServerConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
REQUIRED = os.environ.get("JAILBREAK_ANTIDOTE_REQUIRE_BROWSER") == "1"


def _browser():
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        reason = f"the browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 "--disable-gpu"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def playground(tokenizer, qwen2_antidote, tmp_path_factory):
    """A server with an API key and an antidote that holds a harm probe and a stored tune curve."""
    hidden = qwen2_antidote.directions.shape[-1]
    generator = torch.Generator().manual_seed(0)
    probe = HarmProbe(2, torch.randn(hidden, generator=generator), 0.0, torch.zeros(hidden), torch.ones(hidden))
    high = round(4 * qwen2_antidote.suggested_alpha, 4)
    curve = [{"mode": "fixed", "alpha": 0.0, "threshold": None, "harmful_refusal": 0.3, "benign_refusal": 0.05,
              "positions": "all"}]  # fmt: skip
    curve += [{"mode": mode, "alpha": round(high * f, 4), "threshold": None if mode == "fixed" else 0.5,
               "harmful_refusal": 0.3 + 0.15 * f, "benign_refusal": 0.05 + (0.2 if mode == "fixed" else 0.05) * f,
               "positions": "all"} for f in (0.25, 0.5, 1.0) for mode in ("fixed", "gated")]  # fmt: skip
    alpha = {**qwen2_antidote.alpha, "tuned": {**curve[4], "curve": curve}}
    antidote = dataclasses.replace(qwen2_antidote, probe=probe, alpha=alpha)
    log = tmp_path_factory.mktemp("playground") / "requests.jsonl"
    config = ServerConfig(
        model_name="tiny", default_alpha=0.0, alpha_min=0.0, alpha_max=high, api_key=KEY, max_tokens=64,
        max_batch=8, batch_wait_s=0.01, request_log=log,
    )  # fmt: skip
    server = RunningServer(build_model("qwen2"), tokenizer, antidote, config)
    server.high, server.log = high, log
    yield server
    server.stop()


def _not_blank(png: bytes) -> None:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert image.size[0] >= 800 and colours is not None and len(colours) > 50  # text, controls, the plot
    most = max(count for count, _ in colours)
    assert most < 0.9 * image.size[0] * image.size[1]  # not one flat colour


def _keep(png: bytes, name: str) -> None:
    folder = os.environ.get("JAILBREAK_ANTIDOTE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, name).write_bytes(png)


def test_the_playground_streams_two_answers_and_sends_the_sliders_alpha(playground):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"{playground.url}/playground")
        assert browser.title == "jailbreak-antidote playground"
        # Without the key the page says what is wrong, in the server's words.
        wait.until(lambda b: "API key" in b.find_element(By.ID, "connect-error").text)
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "connect").click()
        wait.until(lambda b: "tiny" in b.find_element(By.ID, "model").text)
        slider = browser.find_element(By.ID, "alpha")
        assert float(slider.get_attribute("max")) == pytest.approx(playground.high)
        modes = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#mode option")]
        assert modes == ["fixed", "gated", "scaled", "monitor"]  # the artifact has a probe
        assert len(browser.find_elements(By.CSS_SELECTOR, "#curve circle")) >= 7  # 7 points, legend, marker
        browser.find_element(By.CSS_SELECTOR, "button[data-example='jailbreak']").click()
        assert "DAN" in browser.find_element(By.ID, "prompt").get_attribute("value")
        chosen = round(playground.high * 0.75, 3)
        browser.execute_script(
            "const s = document.getElementById('alpha'); s.value = arguments[0];"
            "s.dispatchEvent(new Event('input'));", chosen)  # fmt: skip
        chosen = float(browser.execute_script("return document.getElementById('alpha').value;"))  # on a step
        assert chosen == pytest.approx(playground.high * 0.75, rel=0.02)
        browser.execute_script("document.getElementById('max-tokens').value = 24;")
        # Count the text updates of each answer, to see that it arrives in pieces.
        browser.execute_script(
            "window.updates = {plain: 0, steered: 0}; for (const id of ['plain', 'steered']) new MutationObserver("
            "() => window.updates[id]++).observe(document.querySelector('#' + id + ' pre'), "
            "{childList: true, characterData: true, subtree: true});")  # fmt: skip
        lines_before = len(playground.log.read_text().splitlines()) if playground.log.exists() else 0
        browser.find_element(By.ID, "run").click()
        for panel in ("plain", "steered"):
            wait.until(lambda b, p=panel: "harm score" in b.find_element(By.CSS_SELECTOR, f"#{p} .verdict").text)
        plain = browser.find_element(By.CSS_SELECTOR, "#plain pre").text
        steered = browser.find_element(By.CSS_SELECTOR, "#steered pre").text
        assert plain and steered and plain != steered  # the steered answer differs from the unsteered one
        updates = browser.execute_script("return window.updates;")
        assert updates["plain"] > 1 and updates["steered"] > 1  # streamed, not written once
        verdict = browser.find_element(By.CSS_SELECTOR, "#steered .verdict").text
        assert f"alpha {chosen:.3f}" in verdict and ("refused" in verdict or "answered" in verdict)
        entries = [json.loads(line) for line in playground.log.read_text().splitlines()[lines_before:]]
        assert sorted(e["alpha"] for e in entries) == [0.0, pytest.approx(chosen)]  # what the slider said
        assert browser.find_elements(By.ID, "current")  # the current setting is marked on the curve
        png = browser.get_screenshot_as_png()
        _not_blank(png)
        _keep(png, "playground.png")
        # Refusing outright from harm probability 0: the chosen side is refused by the probe, the alpha-0 side
        # (sent with refuse_threshold "never") is not.
        browser.find_element(By.ID, "refuse").send_keys("0")
        browser.find_element(By.ID, "run").click()
        wait.until(lambda b: "refused outright" in b.find_element(By.CSS_SELECTOR, "#steered .verdict").text)
        wait.until(lambda b: "harm score" in b.find_element(By.CSS_SELECTOR, "#plain .verdict").text)
        assert browser.find_element(By.CSS_SELECTOR, "#steered pre").text == REFUSAL_MESSAGE
        assert browser.find_element(By.CSS_SELECTOR, "#plain pre").text == plain
        entries = [json.loads(line) for line in playground.log.read_text().splitlines()[lines_before + 2 :]]
        assert sorted(e["refuse_threshold"] is None for e in entries) == [False, True]
    finally:
        browser.quit()


def test_the_curve_the_page_draws_holds_only_checked_values(qwen2_antidote):
    """Artifact metadata is not under the checksum: a crafted curve point must not reach the page as markup."""
    from jailbreak_antidote.server.app import _tune_curve

    good = {"mode": "gated", "alpha": 1.0, "threshold": 0.4, "harmful_refusal": 0.8, "benign_refusal": 0.1}
    crafted = [{**good, "mode": '<img src=x onerror="alert(1)">'}, {**good, "alpha": "1e999"},
               {**good, "harmful_refusal": None}, "not a point", {**good, "positions": "<b>"},
               {**good, "refuse_threshold": "<script>"}, {**good, "refuse_threshold": float("nan")}]  # fmt: skip
    alpha = {**qwen2_antidote.alpha, "tuned": {**good, "curve": [good, {**good, "refuse_threshold": 0.7}, *crafted]}}
    points = _tune_curve(dataclasses.replace(qwen2_antidote, alpha=alpha))
    assert points == [{**good, "positions": "all", "refuse_threshold": None},
                      {**good, "positions": "all", "refuse_threshold": 0.7}]  # fmt: skip
