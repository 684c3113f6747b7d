"""Open reports in Debian's headless Chromium via Selenium (used by the tests and the benchmark).

Nothing is downloaded: the browser and driver are the system's `chromium` / `chromedriver`
(apt-get install chromium chromium-driver), started with flags that keep it fully offline.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

INSTALL_HINT = "install them with `apt-get install -y chromium chromium-driver` (bash tests/setup_and_test.sh does)"

OFFLINE_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"]


class BrowserMissing(RuntimeError):
    """Chromium, chromedriver or selenium is not installed; the message says how to get them."""


def find_browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [n for n, p in (("chromium", chromium), ("chromedriver", driver)) if not p]
    if missing:
        raise BrowserMissing(f"{' and '.join(missing)} not found on PATH: {INSTALL_HINT}")
    return chromium, driver  # type: ignore[return-value]


def start_chromium(user_data_dir: str | Path | None = None) -> Any:
    """A Selenium Chrome driver on headless Chromium with browser console logs enabled."""
    chromium, driver = find_browser()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserMissing("the selenium package is missing: pip install -e '.[dev]'") from None
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium  # with both paths given Selenium never tries to download one
    for flag in OFFLINE_FLAGS + [f"--user-data-dir={user_data_dir or tempfile.mkdtemp(prefix='cirgen-chromium-')}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(driver))


def wait_rendered(drv: Any, after: int = 0, timeout: float = 20.0) -> int:
    """Wait until the viewer has finished a render newer than `after`; return its render number."""
    deadline = time.monotonic() + timeout
    while True:
        token = drv.execute_script("return document.body.dataset.rendered || '0'")
        if int(token) > after:
            return int(token)
        if time.monotonic() > deadline:
            err = drv.execute_script(
                "const e = document.getElementById('error'); return e && !e.hidden ? e.textContent : ''")
            raise TimeoutError(f"report did not render within {timeout} s {err}".strip())
        time.sleep(0.02)
