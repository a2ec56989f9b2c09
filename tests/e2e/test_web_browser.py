"""The web pages in a real browser: headless Chromium from Debian's packages (driven by
Selenium through Debian's chromedriver; nothing is downloaded), in front of `sourceauth serve`
run as the operator runs it (SMTP, workers and web in their own processes, Maildir delivery).

Set SOURCEAUTH_SCREENSHOTS=docs to refresh the README's screenshots of both pages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

from tests.integration.smtp_harness import free_port, message, parsed, write_config
from tests.support.smtp_sink import Sink
from tests.support.waiting import wait_until

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SOURCEAUTH = str(Path(sys.executable).with_name("sourceauth"))
RCPT = "bob@example.test"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Served:
    config: Path
    smtp_port: int
    web: str
    relay: Sink
    mail: Path

    def send(self, sender: str, subject: str) -> None:
        import smtplib

        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
            client.sendmail(sender, [RCPT], message(sender, RCPT, subject=subject))

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [SOURCEAUTH, *args, "--config", str(self.config)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def sender_state(self, address: str) -> str:
        rows = json.loads(self.cli("senders", "list", "--json"))
        return next(r["state"] for r in rows if r["address"] == address)

    def delivered_subjects(self) -> list[str]:
        files = [p for p in self.mail.rglob("*") if p.is_file() and p.parent.name == "new"]
        return sorted(str(message_from_bytes(p.read_bytes())["Subject"]) for p in files)


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        hint = "apt-get install -y chromium chromium-driver (.ci/run does)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing} not installed: {hint}", pytrace=False)
        pytest.skip(f"{missing} not installed: {hint}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1180,640")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    smtp_port, web_port = free_port(), free_port()
    with Sink() as relay:
        path = write_config(
            tmp_path,
            relay=f"smtp://127.0.0.1:{relay.port}",
            next_hop=f"maildir:{tmp_path / 'mail'}",
            port=smtp_port,
            extra=f'\n[web]\nlisten = "127.0.0.1:{web_port}"\n',
        )
        process = subprocess.Popen([SOURCEAUTH, "serve", "--config", str(path)])
        try:
            wait_until(
                lambda: _listening(smtp_port) and _listening(web_port),
                message="sourceauth serve to listen for SMTP and the web",
            )
            yield Served(path, smtp_port, f"http://127.0.0.1:{web_port}", relay, tmp_path / "mail")
        finally:
            process.terminate()
            process.wait(60)


def _shown(driver: Any, element_id: str) -> str:
    """The text of the element once the page after a click shows it (or a refusal: fail)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def read(d: Any) -> tuple[str, str] | None:
        # The click's new page may replace the old one between finding and reading an element:
        # a stale element is read again from the page that replaced it.
        found = d.find_elements(By.ID, element_id) or d.find_elements(By.ID, "refused")
        return (found[0].get_attribute("id"), found[0].text) if found else None

    shown_id, text = WebDriverWait(
        driver, 30, ignored_exceptions=(StaleElementReferenceException,)
    ).until(read)
    assert shown_id == element_id, driver.page_source
    return str(text)


def _screenshot(driver: Any, name: str) -> None:
    directory = os.environ.get("SOURCEAUTH_SCREENSHOTS")
    if directory:
        driver.save_screenshot(str(Path(directory) / name))


def test_a_sender_confirms_by_link_in_chromium_after_a_get_confirmed_nothing(
    served: Served, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    served.send("alice@sender.test", "Lunch on Friday?")
    challenge = served.relay.wait_for(1)[0]
    body = parsed(challenge).get_payload(decode=True).decode()
    link = re.search(r"(http://\S+/confirm/\S+)", body)
    assert link, body
    browser.get(link.group(1))  # what a link scanner does, too
    assert browser.find_element(By.ID, "confirm").is_displayed()
    _screenshot(browser, "web-confirm.png")
    browser.get(link.group(1))
    assert served.sender_state("alice@sender.test") == "challenged"
    assert served.delivered_subjects() == []
    browser.find_element(By.ID, "confirm").click()
    assert "confirmed" in _shown(browser, "confirmed")
    wait_until(lambda: served.delivered_subjects() == ["Lunch on Friday?"], message="delivery")
    assert served.sender_state("alice@sender.test") == "authorized"


def test_a_recipient_releases_one_message_and_blocks_another_sender_in_chromium(
    served: Served, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    served.send("carol@friends.test", "Photos from the trip")
    served.send("offers@bulk.test", "<b>WIN</b> a prize & more")
    served.relay.wait_for(2)
    link = served.cli("quarantine", "link", RCPT).strip()
    browser.get(link)
    rows = browser.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 2
    assert "<b>WIN</b> a prize & more" in browser.page_source.replace("&lt;", "<").replace(
        "&gt;", ">"
    ).replace("&amp;", "&")
    assert not browser.find_elements(By.CSS_SELECTOR, "td b")  # the subject stayed text
    _screenshot(browser, "web-review.png")

    def button(sender: str, action: str) -> Any:
        row = next(
            r for r in browser.find_elements(By.CSS_SELECTOR, "tbody tr") if sender in r.text
        )
        return row.find_element(By.CSS_SELECTOR, f'button[value="{action}"]')

    button("carol@friends.test", "release").click()
    assert "Released" in _shown(browser, "notice")
    wait_until(
        lambda: served.delivered_subjects() == ["Photos from the trip"], message="the release"
    )
    button("offers@bulk.test", "block").click()
    wait_until(lambda: "blocked" in _shown(browser, "notice"), message="the block's page")
    assert browser.find_element(By.ID, "empty").is_displayed()
    assert served.sender_state("offers@bulk.test") == "blocked"
    assert served.sender_state("carol@friends.test") == "challenged"
    assert served.delivered_subjects() == ["Photos from the trip"]
