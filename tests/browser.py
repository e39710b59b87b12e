"""Headless Chromium (Debian's chromium + chromium-driver) driven by Selenium, for UI tests."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

# Without the background-networking flags Chromium keeps calling hosts this machine cannot reach.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1440,1000")


def chromium_driver():
    """A fresh headless Chromium; skips the test when Chromium or its driver is not installed
    (``make browser`` installs both)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.access(binary, os.X_OK) and os.access(driver, os.X_OK)):
        pytest.skip("Chromium and chromedriver are not installed (make browser, or apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(condition, timeout: float = 60.0, interval: float = 0.5, what: str = "the page"):
    """Poll ``condition()`` until it returns something truthy; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # an element not there yet, or replaced while React re-renders
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def button(driver, text: str, starts: bool = False):
    from selenium.webdriver.common.by import By

    for element in driver.find_elements(By.TAG_NAME, "button"):
        try:
            label = element.text.strip()
            if element.is_displayed() and (label.startswith(text) if starts else label == text):
                return element
        except Exception:  # replaced while React re-renders
            continue
    return None


def click_first(elements) -> bool:
    """Click the first of ``elements`` that takes the click (not hidden, not covered)."""
    for element in elements:
        if element is None:
            continue
        try:
            if element.is_displayed():
                element.click()
                return True
        except Exception:  # covered by another element, or gone after a re-render
            continue
    return False


def page_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def choose_only_partition(driver, name: str) -> None:
    """In an open launch dialog, select exactly the partition ``name``, whatever the dialog preselected.

    The dialog's default selection depends on the instance's history (after backfills and
    failed runs it may open on "All" or "Failed", with no empty picker to click): switch to
    "Custom", empty the selection with the list's "Select all" box, then tick ``name``.
    """
    from selenium.webdriver.common.by import By

    click_first([button(driver, "Custom")])

    def list_open() -> bool:
        if driver.find_elements(By.XPATH, "//input[@placeholder='Filter partitions']"):
            return True
        click_first(driver.find_elements(By.XPATH, "//*[contains(@class, 'TagSelector_tagSelectorContainer')]"))
        return False

    wait_for(list_open, what="the partition list")

    def nothing_selected() -> bool:
        if "0 partitions" in page_text(driver):
            return True
        click_first(driver.find_elements(By.XPATH, "//*[starts-with(normalize-space(text()), 'Select all')]"))
        return False

    wait_for(nothing_selected, interval=1, what="an empty partition selection")
    # The list is drawn last, over the page (which may name the partition too).
    wait_for(lambda: click_first(reversed(driver.find_elements(By.XPATH, f"//*[text()='{name}']"))), what=f"the partition {name} in the list")
    wait_for(lambda: "1 partition" in page_text(driver), what="one partition selected")


def dismiss_prompts(driver) -> None:
    """Close Dagster's first-visit community prompt when it shows."""
    click_first([button(driver, "Skip")])


def screenshot(driver, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
