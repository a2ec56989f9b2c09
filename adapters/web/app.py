"""The web pages as a Starlette application: a challenge link's page (GET shows a button, only
its POST confirms) and a recipient's quarantine behind a signed, expiring review link.

Every POST checks a CSRF token bound to an HttpOnly, SameSite=Strict cookie; templates are
autoescaped and show no message body; every response carries a strict Content-Security-Policy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sourceauth.engine import tokens
from sourceauth.engine.api import HeldMessage, LinkState
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.errors import SourceAuthError
from sourceauth.engine.logs import get_logger
from sourceauth.engine.message import HELD_STATES

log = get_logger(__name__)

CSRF_COOKIE = "sourceauth_csrf"
_COOKIE_RE = re.compile(r"[A-Za-z0-9_-]{43}\Z")
_FORM_MAX = 4096  # bytes of a POSTed form
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        b"base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # The link's token never leaves in a Referer; same-origin (not no-referrer) keeps the
    # browser's Origin header on our own POSTs, which form() checks.
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
REVIEW_ACTIONS = ("release", "discard", "allow", "block")

# (status, title, text) of each page that refuses; nothing else is shown on it.
REFUSALS: dict[str, tuple[int, str, str]] = {
    LinkState.INVALID: (404, "This link is not valid", "Check that you opened the whole link."),
    LinkState.EXPIRED: (
        410,
        "This link has expired",
        "The confirmation period has ended; the held message will not be delivered.",
    ),
    LinkState.CLOSED: (
        410,
        "This link was already used",
        "This request is closed: it was confirmed or withdrawn. Nothing more is needed.",
    ),
    "review": (404, "This link is not valid", "It may have expired; ask for a new one."),
    "message": (404, "No such held message", "It may have been released or removed already."),
    "csrf": (
        403,
        "This form has expired",
        "Nothing was done. Open the link again and press the button once more.",
    ),
    "login": (401, "Sign in", "The operator view needs the operator's name and password."),
    "busy": (429, "Too many requests", "Nothing was done. Try again in a minute."),
    "form": (400, "Bad request", "Nothing was done."),
}


class RateLimiter:
    """At most `per_minute` requests per client address in each clock minute."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.window = -1
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def allow(self, client: str) -> bool:
        window = int(self.clock() // 60)
        with self.lock:
            if window != self.window:  # a new minute: memory stays bounded by one minute's clients
                self.window, self.counts = window, {}
            self.counts[client] = count = self.counts.get(client, 0) + 1
        return count <= self.per_minute


class SecurityHeaders:
    """ASGI middleware: the same strict headers on every response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


class WebPages:
    """The routes, around one engine (its calls block: they run in Starlette's thread pool)."""

    def __init__(
        self,
        engine: SourceAuth,
        *,
        base_url: str,
        requests_per_minute: int,
        operator: tuple[str, str] | None = None,
    ) -> None:
        self.engine = engine
        # The operator's (user, password), kept only as a digest compared in constant time.
        self.login: tuple[str, bytes] | None = None
        if operator is not None:
            digest = hashlib.sha256(f"{operator[0]}\0{operator[1]}".encode()).digest()
            self.login = (operator[0], digest)
        self.limiter = RateLimiter(requests_per_minute)
        url = urlsplit(base_url)
        self.origin = f"{url.scheme}://{url.netloc}"
        self.secure = url.scheme == "https"
        self.csrf_key = tokens.derived_key(engine.keyring, "web csrf")
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("sourceauth.adapters.web", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.style = (files("sourceauth.adapters.web") / "templates" / "style.css").read_bytes()

    def routes(self) -> list[Route]:
        return [
            Route("/style.css", self.stylesheet),
            Route("/confirm/{token}", self.confirm, methods=["GET", "POST"]),
            Route("/review/{link}", self.review, methods=["GET", "POST"]),
            Route("/operator", self.operator, methods=["GET", "POST"]),
        ]

    # ------------------------------------------------------------------ pages

    async def stylesheet(self, request: Request) -> Response:
        return Response(self.style, media_type="text/css")

    async def confirm(self, request: Request) -> Response:
        token = request.path_params["token"]
        if not self.limiter.allow(_client(request)):
            return self.refused(request, "busy")
        if request.method == "POST":
            form = await self.form(request, token)
            if isinstance(form, str):
                return self.refused(request, form)
            result = await run_in_threadpool(self.engine.confirm_by_link, token, actor="web")
            if result.confirmed:
                return self.page(request, "confirmed.html", 200, released=result.released)
        state = await run_in_threadpool(self.engine.link_state, token)
        if state is not LinkState.PENDING:
            return self.refused(request, state)
        if request.method == "POST":  # pending still, yet refused: say nothing more
            return self.refused(request, LinkState.INVALID)
        return self.page(request, "confirm.html", 200, form=token)

    async def review(self, request: Request) -> Response:
        link = request.path_params["link"]
        if not self.limiter.allow(_client(request)):
            return self.refused(request, "busy")
        try:
            now = int(self.engine.clock())
            recipient = tokens.verify_review_link(self.engine.keyring, link, now=now)
        except tokens.TokenError:
            return self.refused(request, "review")
        return await self.held_page(request, link, recipient, f"web:{recipient}")

    async def operator(self, request: Request) -> Response:
        """Every recipient's held mail, behind HTTP Basic credentials from the configuration."""
        if not self.limiter.allow(_client(request)):
            return self.refused(request, "busy")
        user = self.operator_user(request)
        if user is None:
            response = self.refused(request, "login")
            response.headers["www-authenticate"] = 'Basic realm="sourceauth", charset="UTF-8"'
            return response
        return await self.held_page(request, "operator", None, f"web-operator:{user}")

    async def held_page(
        self, request: Request, bound_to: str, recipient: str | None, actor: str
    ) -> Response:
        """The held-mail table (one recipient's, or everybody's for None) and its actions."""
        notice = ""
        if request.method == "POST":
            form = await self.form(request, bound_to)
            if isinstance(form, str):
                return self.refused(request, form)
            done = await run_in_threadpool(self.act, recipient, actor, form)
            if done is None:
                return self.refused(request, "message")
            notice = done
        held = await run_in_threadpool(self.held_for, recipient)
        return self.page(
            request,
            "review.html",
            200,
            form=bound_to,
            recipient=recipient,
            held=[_row(m) for m in held],
            notice=notice,
        )

    def operator_user(self, request: Request) -> str | None:
        """The operator's name when the request carries the configured credentials."""
        if self.login is None:
            return None
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        given = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        if scheme.lower() != "basic" or not hmac.compare_digest(given, self.login[1]):
            return None
        return user

    # ------------------------------------------------------------------ engine inputs

    def held_for(self, recipient: str | None) -> list[HeldMessage]:
        held = [m for state in sorted(HELD_STATES) for m in self.engine.quarantine(state=state)]
        mine = (m for m in held if recipient is None or recipient in m.recipients)
        return sorted(mine, key=lambda m: m.received)

    def act(self, recipient: str | None, actor: str, form: dict[str, str]) -> str | None:
        """One action on a message held for `recipient` (any, for None), recorded with `actor`;
        None when the message is not held for that recipient (or the action is unknown)."""
        action = form.get("action", "")
        try:
            held = self.engine.held_message(form.get("message", ""))
        except SourceAuthError:
            return None
        if action not in REVIEW_ACTIONS or held.state not in HELD_STATES:
            return None
        if recipient is not None and recipient not in held.recipients:
            return None
        reason = f"{action} by {actor.partition(':')[0]}"
        try:
            if action == "release":
                self.engine.release(held.id, actor=actor, reason=reason)
            elif action == "discard":
                self.engine.discard(held.id, actor=actor, reason=reason)
            else:
                verb = self.engine.authorize if action == "allow" else self.engine.block
                scope = self.engine.scope_for(recipient or held.recipients[0])
                verb(held.sender, scope=scope, actor=actor, reason=reason)
        except SourceAuthError:
            return None
        return {
            "release": f"Released the message from {held.sender}.",
            "discard": f"Discarded the message from {held.sender}.",
            "allow": f"{held.sender} is now always allowed.",
            "block": f"{held.sender} is now blocked.",
        }[action]

    # ------------------------------------------------------------------ forms and pages

    async def form(self, request: Request, bound_to: str) -> dict[str, str] | str:
        """The POSTed form when its CSRF token matches the cookie, else the refusal's name."""
        origin = request.headers.get("origin")
        if origin is not None and origin != self.origin:
            return "csrf"
        if request.headers.get("content-type", "").split(";")[0].strip() != (
            "application/x-www-form-urlencoded"
        ):
            return "form"
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > _FORM_MAX:
                return "form"
        try:
            pairs = parse_qs(body.decode("ascii"), max_num_fields=8, strict_parsing=False)
        except (UnicodeDecodeError, ValueError):
            return "form"
        form = {key: values[0] for key, values in pairs.items()}
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not _COOKIE_RE.match(cookie) or not hmac.compare_digest(
            form.get("csrf", ""), self.csrf(cookie, bound_to)
        ):
            return "csrf"
        return form

    def csrf(self, cookie: str, bound_to: str) -> str:
        message = f"{cookie}\0{bound_to}".encode()
        return hmac.new(self.csrf_key, message, hashlib.sha256).hexdigest()

    def page(self, request: Request, template: str, status: int, **values: Any) -> Response:
        cookie = request.cookies.get(CSRF_COOKIE, "")
        fresh = not _COOKIE_RE.match(cookie)
        if fresh:
            cookie = secrets.token_urlsafe(32)
        if "form" in values:
            values["csrf"] = self.csrf(cookie, values["form"])
        html = self.templates.get_template(template).render(**values)
        response = HTMLResponse(html, status_code=status)
        if fresh:
            response.set_cookie(
                CSRF_COOKIE, cookie, path="/", secure=self.secure, httponly=True, samesite="strict"
            )
        return response

    def refused(self, request: Request, name: str) -> Response:
        status, title, text = REFUSALS[name]
        log.info("web_refused", refusal=str(name), path=request.url.path.split("/")[1])
        response = self.page(request, "refused.html", status, title=title, text=text)
        if status == 429:
            response.headers["retry-after"] = "60"
        return response


def web_app(
    engine: SourceAuth,
    *,
    base_url: str,
    requests_per_minute: int,
    operator: tuple[str, str] | None = None,
) -> ASGIApp:
    """The ASGI application `sourceauth serve` runs for `[web]`."""
    pages = WebPages(
        engine, base_url=base_url, requests_per_minute=requests_per_minute, operator=operator
    )
    return SecurityHeaders(Starlette(routes=pages.routes()))


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


def _row(m: HeldMessage) -> dict[str, str]:
    return {
        "id": m.id,
        "sender": m.sender,
        "recipients": ", ".join(m.recipients),
        "subject": m.subject or "(no subject)",
        "date": datetime.fromtimestamp(m.received, UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "size": _size(m.size),
        "reason": m.reason,
    }


def _size(octets: int) -> str:
    if octets < 1000:
        return f"{octets} bytes"
    return f"{octets / 1000:.1f} KB" if octets < 1_000_000 else f"{octets / 1_000_000:.1f} MB"
