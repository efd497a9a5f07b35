"""Headless Chromium for the browser tests: selenium driving Debian's ``chromium`` + ``chromium-driver``.

``.ci/browser`` installs both when they are missing (``.ci/run`` calls it), ``requirements.txt``
installs selenium. Where one of them is missing, :func:`require_browser` skips the test with
the reason -- except under CI (``CI`` set to anything but ``""``/``0``/``false``), where it
fails, so CI cannot go green without having run the browser tests.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find_chromium() -> tuple:
    """``(browser, driver)`` paths (``None`` where not found)."""
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver = next((shutil.which(d) or (d if Path(d).is_file() else None) for d in DRIVERS
                   if shutil.which(d) or Path(d).is_file()), None)
    return browser, driver


def missing_parts() -> list:
    """What the browser tests lack here, in words (empty: nothing)."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -r requirements.txt)")
    browser, driver = find_chromium()
    if browser is None:
        missing.append("a Chromium browser (apt-get install chromium)")
    if driver is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    return missing


def require_browser() -> tuple:
    """``(browser, driver)``; skips the test outside CI when something is missing, fails under CI."""
    missing = missing_parts()
    if missing:
        reason = ("the browser tests need " + ", ".join(missing) + "; `bash .ci/browser` installs them "
                  "(as root, Debian/Ubuntu)")
        if in_ci():
            pytest.fail(reason + " -- CI is set, so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)
    return find_chromium()


def start_chrome(browser: str, driver: str, width: int = 1280, height: int = 1000):
    """A headless Chromium session (selenium), offline-friendly: the given binaries, no driver download."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
                # only this machine answers: a page that needs the network shows it at once, without DNS waits
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    opts.set_capability("unhandledPromptBehavior", "accept")  # "leave the page?" never blocks a navigation
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def artefact_dir(tmp_path: Path) -> Path:
    """Where screenshots go: ``$RETRIEVAL_ARTEFACTS`` when set (CI can keep it), else the test's tmp folder."""
    root = os.environ.get("RETRIEVAL_ARTEFACTS")
    out = Path(root).expanduser() if root else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


def full_page_screenshot(drv, path: Path, max_height: int = 6000) -> Path:
    """A screenshot of the whole page (up to ``max_height`` px), not only the window."""
    height = min(max_height, int(drv.execute_script("return document.documentElement.scrollHeight") or 1000))
    width = int(drv.execute_script("return document.documentElement.scrollWidth") or 1280)
    drv.set_window_size(max(width, 800), max(height, 600))
    drv.save_screenshot(str(path))
    return path
