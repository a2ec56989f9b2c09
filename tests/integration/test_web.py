"""The web pages over HTTP on a real loopback socket, in front of a real filter (SQLite, SMTP
sinks): every route, and every refusal, with what each one records (or does not)."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sourceauth.adapters.config import load_config
from sourceauth.adapters.runtime import Filter
from tests.integration.smtp_harness import free_port, message, parsed, token_of, write_config
from tests.support.smtp_sink import Sink
from tests.support.waiting import wait_outbound_idle, wait_until
from tests.support.web import Browser, Page

SOURCEAUTH = str(Path(sys.executable).with_name("sourceauth"))
SENDER = "alice@sender.test"
RCPT = "bob@example.test"


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Web:
    flt: Filter
    relay: Sink
    next_hop: Sink
    base: str
    clock: Clock
    config: Path

    @property
    def app(self) -> Any:
        return self.flt.app

    def send(self, sender: str, rcpt: str, subject: str = "hello") -> None:
        import smtplib

        with smtplib.SMTP("127.0.0.1", self.flt.port, timeout=30) as client:
            client.sendmail(sender, [rcpt], message(sender, rcpt, subject=subject))

    def challenge_link(self, sender: str = SENDER) -> str:
        """Send a message from a stranger and return the link its challenge carries."""
        before = len(self.relay.messages)
        self.send(sender, RCPT)
        challenge = self.relay.wait_for(before + 1)[-1]
        body = parsed(challenge).get_payload(decode=True).decode()
        found = re.search(r"(http://\S+/confirm/\S+)", body)
        assert found, body
        assert found.group(1).endswith(token_of(challenge))
        return found.group(1)

    def state(self, address: str = SENDER) -> str:
        return str(self.app.sender(address).state)

    def review_link(self, recipient: str = RCPT, *args: str) -> str:
        done = subprocess.run(
            [SOURCEAUTH, "quarantine", "link", recipient, "--config", str(self.config), *args],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


@contextmanager
def running_web(tmp: Path, web_extra: str = "") -> Iterator[Web]:
    port = free_port()
    with Sink() as relay, Sink() as next_hop:
        path = write_config(
            tmp,
            relay=f"smtp://127.0.0.1:{relay.port}",
            next_hop=f"smtp://127.0.0.1:{next_hop.port}",
            extra=f'\n[web]\nlisten = "127.0.0.1:{port}"\n{web_extra}\n',
        )
        clock = Clock()
        flt = Filter(load_config(path), clock=clock)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(flt.start(), loop).result(30)
        try:
            yield Web(flt, relay, next_hop, f"http://127.0.0.1:{port}", clock, path)
        finally:
            asyncio.run_coroutine_threadsafe(flt.stop(), loop).result(60)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    with running_web(tmp_path) as running:
        yield running


def press(browser: Browser, url: str, page: Page) -> Page:
    return browser.post(url, {"csrf": page.csrf()})


def assert_strict_headers(page: Page) -> None:
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "form-action 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "script-src" not in csp
    assert page.headers["referrer-policy"] == "same-origin"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"


# ---------------------------------------------------------------- confirmation by link


def test_challenge_carries_the_link_and_a_get_confirms_nothing(web: Web) -> None:
    url = web.challenge_link()
    browser = Browser()
    for _ in range(3):  # a link scanner fetching it again and again
        page = browser.get(url)
        assert page.status == 200 and 'name="csrf"' in page.text and "<button" in page.text
    assert_strict_headers(page)
    wait_outbound_idle(web.app)
    assert web.state() == "challenged"
    assert web.next_hop.messages == []
    assert browser.get(url).set_cookies == []  # the cookie is set once, then kept
    (cookie,) = Browser().get(url).set_cookies
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    assert "Path=/" in cookie and "Secure" not in cookie  # an http base_url


def test_the_buttons_post_confirms_as_the_web_and_releases_the_held_mail(web: Web) -> None:
    url = web.challenge_link()
    browser = Browser()
    done = press(browser, url, browser.get(url))
    assert done.status == 200 and 'id="confirmed"' in done.text
    assert web.state() == "authorized"
    delivered = web.next_hop.wait_for(1)
    assert delivered[0].rcpt_tos == [RCPT]
    confirmed = [h for h in web.app.history(SENDER) if h.event.endswith("Confirmed")]
    assert confirmed and confirmed[0].fields["actor"] == "web"


def test_a_used_link_says_so_and_confirms_nothing_more(web: Web) -> None:
    url = web.challenge_link()
    browser = Browser()
    page = browser.get(url)
    assert press(browser, url, page).status == 200
    again = press(browser, url, page)
    assert again.status == 410 and "already used" in again.text
    assert browser.get(url).status == 410
    events = [h.event for h in web.app.history(SENDER)]
    assert sum(e.endswith("Confirmed") for e in events) == 1


def test_a_forged_or_malformed_link_shows_nothing_and_confirms_nothing(web: Web) -> None:
    url = web.challenge_link()
    token = url.rsplit("/", 1)[1]
    forged = url[: -len(token)] + token[:-3] + ("aaa" if token[-3:] != "aaa" else "bbb")
    browser = Browser()
    for bad in (forged, url[: -len(token)] + "nonsense", url + "x"):
        page = browser.get(bad)
        assert page.status == 404 and "not valid" in page.text and "<button" not in page.text
        assert browser.post(bad, {"csrf": "0" * 64}).status in (403, 404)
    cookie_page = browser.get(url)
    # The form's CSRF field is bound to its own token: posted to a forged one, it is refused.
    assert press(browser, forged, cookie_page).status == 403
    assert web.state() == "challenged"


def test_an_expired_link_says_so_and_confirms_nothing(web: Web) -> None:
    url = web.challenge_link()
    browser = Browser()
    page = browser.get(url)
    web.clock.offset = 8 * 86400.0  # past the 7-day challenge lifetime
    expired = press(browser, url, page)
    assert expired.status == 410 and "expired" in expired.text
    assert browser.get(url).status == 410
    assert web.state() == "challenged"  # nothing recorded (maintenance lapses it later)


def test_a_post_without_the_csrf_cookie_or_field_or_from_elsewhere_is_refused(web: Web) -> None:
    url = web.challenge_link()
    browser = Browser()
    page = browser.get(url)
    no_cookie = Browser().post(url, {"csrf": page.csrf()})
    assert no_cookie.status == 403 and "Nothing was done" in no_cookie.text
    assert browser.post(url, {}).status == 403
    assert browser.post(url, {"csrf": "f" * 64}).status == 403
    for origin in ("http://evil.test", "null"):
        other_site = browser.post(url, {"csrf": page.csrf()}, headers={"Origin": origin})
        assert other_site.status == 403
    as_json = browser.post(url, {"csrf": page.csrf()}, headers={"Content-Type": "application/json"})
    assert as_json.status == 400
    other_link = web.challenge_link("carol@sender.test")  # a token bound to another form
    assert browser.post(other_link, {"csrf": page.csrf()}).status == 403
    assert web.state() == "challenged" and web.state("carol@sender.test") == "challenged"


def test_requests_are_rate_limited_per_client_address(tmp_path: Path) -> None:
    with running_web(tmp_path, "requests_per_minute = 3") as web:
        url = web.challenge_link()
        mallory, alice = Browser(forwarded_for="192.0.2.7"), Browser(forwarded_for="192.0.2.8")
        assert [mallory.get(url).status for _ in range(3)] == [200, 200, 200]
        busy = mallory.get(url)
        assert busy.status == 429 and busy.headers["retry-after"] == "60"
        assert mallory.post(url, {"csrf": "0"}).status == 429
        page = alice.get(url)
        assert page.status == 200
        assert press(alice, url, page).status == 200
        assert web.state() == "authorized"


def test_other_routes_and_methods_get_no_page(web: Web) -> None:
    browser = Browser()
    missing = browser.get(f"{web.base}/admin")
    assert missing.status == 404
    assert_strict_headers(missing)
    assert browser.request("PUT", f"{web.base}/confirm/x").status == 405
    style = browser.get(f"{web.base}/style.css")
    assert style.status == 200 and style.headers["content-type"].startswith("text/css")


# ---------------------------------------------------------------- review by signed link


def test_review_shows_only_this_recipients_held_mail_escaped(web: Web) -> None:
    web.send(SENDER, RCPT, subject="<script>alert(1)</script> & more")
    web.send("dave@sender.test", "erin@example.test", subject="not for bob")
    wait_until(lambda: len(web.app.quarantine()) == 2)
    page = Browser().get(web.review_link())
    assert page.status == 200
    assert_strict_headers(page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page.text
    assert "<script>" not in page.text
    assert SENDER in page.text and "not for bob" not in page.text
    assert "dave@sender.test" not in page.text
    assert "Hi there" not in page.text  # never a body


def test_review_on_an_encrypted_store_shows_the_plaintext_its_views_hold_sealed(
    tmp_path: Path,
) -> None:
    key = tmp_path / "encryption.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    key.chmod(0o600)
    with running_web(tmp_path, f'\n[storage]\nencryption_key_file = "{key}"\n') as web:
        web.send(SENDER, RCPT, subject="Sealed subject & more")
        web.send("dave@sender.test", "erin@example.test", subject="not for bob")
        wait_until(lambda: len(web.app.quarantine()) == 2)
        page = Browser().get(web.review_link())  # the recipient's messages: a sealed lookup
        assert page.status == 200
        assert "Sealed subject &amp; more" in page.text and SENDER in page.text
        assert "not for bob" not in page.text
    stored = b"".join(p.read_bytes() for p in (tmp_path / "var").glob("sourceauth.db*"))
    assert b"Sealed subject" not in stored and SENDER.encode() not in stored


def test_review_release_and_block_are_engine_inputs_recorded_with_the_recipient(web: Web) -> None:
    web.send(SENDER, RCPT, subject="keep me")
    web.send("spam@junk.test", RCPT, subject="junk")
    wait_until(lambda: len(web.app.quarantine()) == 2)
    by_sender = {m.sender: m.id for m in web.app.quarantine()}
    link = web.review_link()
    browser = Browser()
    page = browser.get(link)
    released = browser.post(
        link, {"csrf": page.csrf(), "message": by_sender[SENDER], "action": "release"}
    )
    assert released.status == 200 and "Released the message from" in released.text
    assert web.next_hop.wait_for(1)[0].rcpt_tos == [RCPT]
    blocked = browser.post(
        link, {"csrf": page.csrf(), "message": by_sender["spam@junk.test"], "action": "block"}
    )
    assert blocked.status == 200 and "is now blocked" in blocked.text
    assert web.state("spam@junk.test") == "blocked"
    assert 'id="empty"' in blocked.text
    actors = {h.fields.get("actor") for h in web.app.history("spam@junk.test")}
    assert f"web:{RCPT}" in actors
    released_by = {h.fields.get("actor") for h in web.app.history(by_sender[SENDER])}
    assert f"web:{RCPT}" in released_by


def test_review_discard_and_allow(web: Web) -> None:
    web.send(SENDER, RCPT)
    web.send("frank@sender.test", RCPT)
    wait_until(lambda: len(web.app.quarantine()) == 2)
    by_sender = {m.sender: m.id for m in web.app.quarantine()}
    link = web.review_link()
    browser = Browser()
    csrf = browser.get(link).csrf()
    out = browser.post(link, {"csrf": csrf, "message": by_sender[SENDER], "action": "discard"})
    assert out.status == 200 and "Discarded" in out.text
    assert web.app.held_message(by_sender[SENDER]).state == "discarded"
    out = browser.post(
        link, {"csrf": csrf, "message": by_sender["frank@sender.test"], "action": "allow"}
    )
    assert out.status == 200 and "always allowed" in out.text
    assert web.state("frank@sender.test") == "authorized"


def test_review_refuses_another_recipients_message_unknown_actions_and_no_csrf(web: Web) -> None:
    web.send("dave@sender.test", "erin@example.test")
    web.send(SENDER, RCPT)
    wait_until(lambda: len(web.app.quarantine()) == 2)
    erins = next(m.id for m in web.app.quarantine() if m.sender == "dave@sender.test")
    bobs = next(m.id for m in web.app.quarantine() if m.sender == SENDER)
    link = web.review_link()
    browser = Browser()
    csrf = browser.get(link).csrf()
    refused = browser.post(link, {"csrf": csrf, "message": erins, "action": "release"})
    assert refused.status == 404 and "dave@sender.test" not in refused.text
    assert browser.post(link, {"csrf": csrf, "message": bobs, "action": "delete"}).status == 404
    assert browser.post(link, {"csrf": csrf, "message": "nope", "action": "release"}).status == 404
    assert Browser().post(link, {"csrf": csrf, "message": bobs, "action": "release"}).status == 403
    assert {m.state for m in web.app.quarantine()} == {"challenged"}


def test_a_tampered_or_expired_review_link_shows_nothing(web: Web) -> None:
    web.send(SENDER, RCPT)
    wait_until(lambda: web.app.quarantine())
    link = web.review_link(RCPT, "--ttl", "1h")
    head, recipient_part, mac = link.rsplit(".", 2)
    browser = Browser()
    other = web.review_link("erin@example.test")
    swapped = f"{head}.{other.rsplit('.', 2)[1]}.{mac}"  # another recipient under bob's MAC
    for bad in (swapped, link[:-2] + "AA", link + "x", f"{web.base}/review/x"):
        page = browser.get(bad)
        assert page.status == 404 and SENDER not in page.text and "<table" not in page.text
    web.clock.offset = 2 * 3600.0
    expired = browser.get(link)
    assert expired.status == 404 and SENDER not in expired.text
    del recipient_part


def test_quarantine_link_refuses_bad_input_with_exit_2(web: Web, tmp_path: Path) -> None:
    for args in (["not an address"], [RCPT, "--ttl", "soon"]):
        done = subprocess.run(
            [SOURCEAUTH, "quarantine", "link", *args, "--config", str(web.config)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and "error" in done.stderr
    off = tmp_path / "off"
    off.mkdir()
    path = write_config(off, relay="maildir:./outbox", next_hop="maildir:./mail")
    done = subprocess.run(
        [SOURCEAUTH, "quarantine", "link", RCPT, "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "[web] listen" in done.stderr


# ---------------------------------------------------------------- the operator view


def _basic(user: str, password: str) -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_the_operator_view_needs_the_configured_credentials_and_sees_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCEAUTH_WEB_PASSWORD", "correct horse")
    with running_web(tmp_path, 'operator_user = "postmaster"') as web:
        web.send(SENDER, RCPT, subject="for bob")
        web.send("dave@sender.test", "erin@example.test", subject="for erin")
        wait_until(lambda: len(web.app.quarantine()) == 2)
        url, browser = f"{web.base}/operator", Browser()
        for headers in ({}, _basic("postmaster", "wrong"), _basic("root", "correct horse")):
            page = browser.get(url, headers=headers)
            assert page.status == 401 and "for bob" not in page.text
            assert page.headers["www-authenticate"].startswith("Basic ")
        page = browser.get(url, headers=_basic("postmaster", "correct horse"))
        assert page.status == 200 and "for bob" in page.text and "for erin" in page.text
        erins = next(m.id for m in web.app.quarantine() if m.sender == "dave@sender.test")
        form = {"message": erins, "action": "release"}
        no_csrf = browser.post(url, form, headers=_basic("postmaster", "correct horse"))
        assert no_csrf.status == 403
        done = browser.post(
            url, {**form, "csrf": page.csrf()}, headers=_basic("postmaster", "correct horse")
        )
        assert done.status == 200 and "Released" in done.text
        actors = {h.fields.get("actor") for h in web.app.history(erins)}
        assert "web-operator:postmaster" in actors


def test_without_operator_user_there_is_no_operator_view(web: Web) -> None:
    page = Browser().get(f"{web.base}/operator", headers=_basic("postmaster", ""))
    assert page.status == 401


def test_serve_refuses_to_start_an_operator_view_without_its_password(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        relay="maildir:./outbox",
        next_hop="maildir:./mail",
        extra=f'\n[web]\nlisten = "127.0.0.1:{free_port()}"\noperator_user = "postmaster"\n',
    )
    env = {k: v for k, v in os.environ.items() if k != "SOURCEAUTH_WEB_PASSWORD"}
    done = subprocess.run(
        [SOURCEAUTH, "serve", "--config", str(path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2 and "SOURCEAUTH_WEB_PASSWORD is empty" in done.stderr


# ---------------------------------------------------------------- the digest


def test_the_digest_lists_each_recipients_held_mail_with_a_working_review_link(
    tmp_path: Path,
) -> None:
    with running_web(tmp_path, "digest = true") as web:
        web.send(SENDER, RCPT, subject="first\tfor bob")
        web.send("carol@sender.test", RCPT, subject="second for bob")
        web.send("dave@sender.test", "erin@example.test", subject="for erin")
        wait_until(lambda: len(web.app.quarantine()) == 3)
        assert web.flt.workers is not None and web.flt.workers.digest is not None
        assert web.flt.workers.digest.send_all() == 2
        digests = {m.rcpt_tos[0]: parsed(m) for m in web.next_hop.wait_for(2)}
        assert set(digests) == {RCPT, "erin@example.test"}
        bobs = digests[RCPT]
        assert bobs["Subject"] == "2 messages held for you"
        assert bobs["Auto-Submitted"] == "auto-generated"
        text = bobs.get_payload(decode=True).decode()
        assert "first for bob" in text and "second for bob" in text and "for erin" not in text
        link = re.search(r"(http://\S+/review/\S+)", text)
        assert link
        page = Browser().get(link.group(1))
        assert page.status == 200 and "second for bob" in page.text and "for erin" not in page.text


def test_without_digest_on_the_workers_send_none(web: Web) -> None:
    assert web.flt.workers is not None and web.flt.workers.digest is None
