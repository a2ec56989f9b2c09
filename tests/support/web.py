"""A small HTTP client for the web pages over a real loopback socket: keeps the cookie the
pages set, reads the CSRF field from a page, and never follows a redirect."""

from __future__ import annotations

import http.client
import re
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from urllib.parse import urlencode, urlsplit


@dataclass
class Page:
    status: int
    headers: dict[str, str]
    set_cookies: list[str]
    text: str

    def csrf(self) -> str:
        found = re.search(r'name="csrf" value="([0-9a-f]+)"', self.text)
        assert found, self.text
        return found.group(1)


@dataclass
class Browser:
    """One client: a cookie jar of its own, an optional X-Forwarded-For identity."""

    forwarded_for: str | None = None
    cookies: dict[str, str] = field(default_factory=dict)

    def request(
        self,
        method: str,
        url: str,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Page:
        parts = urlsplit(url)
        send = dict(headers or {})
        if self.cookies:
            send["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if self.forwarded_for:
            send["X-Forwarded-For"] = self.forwarded_for
        body = None
        if form is not None:
            body = urlencode(form).encode()
            send.setdefault("Content-Type", "application/x-www-form-urlencoded")
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        try:
            conn.request(method, parts.path, body=body, headers=send)
            response = conn.getresponse()
            text = response.read().decode()
            set_cookies = response.headers.get_all("set-cookie") or []
            for raw in set_cookies:
                for name, morsel in SimpleCookie(raw).items():
                    self.cookies[name] = morsel.value
            return Page(
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                set_cookies,
                text,
            )
        finally:
            conn.close()

    def get(self, url: str, **kw: object) -> Page:
        return self.request("GET", url, **kw)  # type: ignore[arg-type]

    def post(self, url: str, form: dict[str, str], **kw: object) -> Page:
        return self.request("POST", url, form=form, **kw)  # type: ignore[arg-type]
