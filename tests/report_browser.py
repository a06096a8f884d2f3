"""A run's report.html opened in a real headless browser (Debian's chromium + chromedriver, via
selenium): the page loads, every figure it names loads, and a full-page screenshot is kept."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "runs" / "test-artifacts"


def chromium(profile: Path, window: str = "1500,1000"):
    """A selenium driver on Debian's headless chromium, with a fresh profile and no background traffic."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--window-size={window}",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def check_report_page(run: Path, profile: Path, screenshot: str = "report-page.png") -> Path | None:
    """Called from the demo's test: without a browser (.ci/run installs one) it warns, and the rest of that test runs."""
    if not (CHROMIUM and CHROMEDRIVER):
        warnings.warn("report.html not opened: needs Debian's chromium and chromedriver (apt)")
        return None
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    figures = json.loads((run / "report.json").read_text())["figures"]
    driver = chromium(profile)
    try:
        driver.get((run / "report.html").as_uri())
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
        assert driver.title == "rs5m run report"
        images = driver.find_elements(By.TAG_NAME, "img")
        assert sorted(i.get_attribute("src").rsplit("/", 1)[-1] for i in images) == sorted(f["file"] for f in figures)
        for img in images:  # decoded by the browser, at its real size
            width = driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
            assert width and width > 300, img.get_attribute("src")
        assert driver.find_elements(By.TAG_NAME, "table")
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1500, min(height + 100, 16000))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / screenshot
        assert driver.save_screenshot(str(path))
        return path
    finally:
        driver.quit()
