"""Who may call the admin listener: tokens, scopes and the Host allow-list (docs/security.md).

Kept apart from the handlers so that every process serving history (today the consumer's
admin listener; later a separate history role, and the console) applies the same rules with
one middleware:

* `/metrics`, `/healthz` and `/readyz` are open: Prometheus and the kubelet call them.
* Everything under a protected prefix (`/api/` by default) needs a bearer token and a Host
  header naming this service. Reads (GET, HEAD) take the read-only token
  (PERKAMO_ADMIN_READ_TOKEN) or the admin token; anything else, and reading a stored payload,
  takes the admin token (PERKAMO_ADMIN_TOKEN). A scope with no token configured is refused
  (403) rather than left open.
* The Host allow-list (PERKAMO_ADMIN_ALLOWED_HOSTS; by default the loopback names and the
  listen host) stops DNS rebinding: a page on another origin whose name was re-pointed at
  this listener sends its own Host, which is answered 421.

Tokens are compared in constant time (`hmac.compare_digest`) as bytes. A wrong token, or an
Authorization header that is not ASCII or absurdly long, is a 401 (never an exception) and is
counted by a throttle (consumer.throttle) per peer address and per token prefix: 5 wrong tokens
with one prefix from one address in a minute, or 20 in all from one address, and that address
gets 429 for the rest of the minute; a caller with another token behind the same proxy does not.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import orjson
from aiohttp import web

from consumer.config import Settings
from consumer.errors import PerkamoError, Throttled
from consumer.throttle import Throttle, subject_of

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

READ: Final = "read"
ADMIN: Final = "admin"
OPEN_PATHS: Final = frozenset({"/metrics", "/healthz", "/readyz"})
LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})
_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - names, not binds
_REALM: Final = 'Bearer realm="perkamo-admin"'
_MAX_AUTHORIZATION: Final = 1024


class AuthError(PerkamoError):
    """A refused call: HTTP status, a sentence, and headers for the answer."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=orjson.dumps({"error": str(self)}),
            content_type="application/json",
            headers=self.headers,
        )


def host_of_header(value: str) -> str:
    """The host part of a Host header, lower-cased: `[::1]:9464` -> `::1`, `Name.:80` -> `name`."""
    text = value.strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    if text.count(":") == 1:
        text = text.partition(":")[0]
    return text.rstrip(".")


def default_allowed_hosts(listen_host: str) -> frozenset[str]:
    """Loopback names plus the host the listener binds (unless it is a wildcard)."""
    listen = listen_host.strip("[]").lower()
    return LOOPBACK_NAMES | ({listen} if listen not in _WILDCARDS else set())


@dataclass(frozen=True)
class AdminAuth:
    """The rules of one admin listener; `middleware` applies them to every request."""

    admin_token: str
    read_token: str
    allowed_hosts: frozenset[str]
    protected_prefixes: tuple[str, ...] = ("/api/",)
    throttle: Throttle = field(default_factory=Throttle, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> AdminAuth:
        host, _ = settings.admin_host_port
        allowed = default_allowed_hosts(host) | {
            host_of_header(h) for h in settings.admin_allowed_hosts
        }
        return cls(
            admin_token=settings.admin_token.get_secret_value(),
            read_token=settings.admin_read_token.get_secret_value(),
            allowed_hosts=frozenset(allowed),
        )

    def protects(self, path: str) -> bool:
        return path not in OPEN_PATHS and path.startswith(self.protected_prefixes)

    def check_host(self, request: web.Request) -> None:
        """Refuse a Host header that does not name this service (DNS rebinding)."""
        given = request.headers.get("Host", "")
        if not given.isascii() or host_of_header(given) not in self.allowed_hosts:
            raise AuthError(
                421,
                "the Host header does not name this service; add the name you use to "
                "PERKAMO_ADMIN_ALLOWED_HOSTS",
            )

    def require(self, request: web.Request, scope: str) -> None:
        """Raise AuthError unless the request carries a token good for `scope`."""
        accepted = self._tokens(scope)
        if not accepted:
            setting = "PERKAMO_ADMIN_TOKEN" if scope == ADMIN else (
                "PERKAMO_ADMIN_READ_TOKEN or PERKAMO_ADMIN_TOKEN")
            raise AuthError(403, f"set {setting} on the consumer to allow this call")
        which = "admin token" if scope == ADMIN else "read or admin token"
        setting = "PERKAMO_ADMIN_TOKEN" if scope == ADMIN else "PERKAMO_ADMIN_READ_TOKEN"
        header = request.headers.get("Authorization")
        if header is None:  # no credential tried: nothing to count
            raise AuthError(401, f"missing {which} (Authorization: Bearer <{setting}>)",
                            headers={"WWW-Authenticate": _REALM})
        # The header is admitted before anything is compared, and checked against the limits of
        # its token prefix from this address (no await from here to the verdict).
        try:
            attempt = self.throttle.admit(request.remote or "?")
            given = bearer_token(header)
            subject = subject_of("bearer", given or header.strip().partition(" ")[2].strip())
            self.throttle.check(attempt, subject, across_peers=False)
        except Throttled as exc:
            raise AuthError(429, f"too many wrong tokens from this address: try again in "
                                 f"{exc.retry_after} s", headers={"Retry-After": str(exc.retry_after)}
                            ) from None
        if given is None or not any(token_ok(token, given) for token in accepted):
            self.throttle.failed(attempt, subject, across_peers=False)
            shape = "" if given is not None or header.isascii() else "; it must be ASCII"
            raise AuthError(
                401,
                f"missing or wrong {which} (Authorization: Bearer <{setting}>){shape}",
                headers={"WWW-Authenticate": _REALM},
            )
        self.throttle.release(attempt)

    def _tokens(self, scope: str) -> tuple[str, ...]:
        if scope == ADMIN:
            return (self.admin_token,) if self.admin_token else ()
        return tuple(t for t in (self.admin_token, self.read_token) if t)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Host check and the read scope for protected paths; handlers ask for ADMIN."""
        try:
            if self.protects(request.path):
                self.check_host(request)
                scope = READ if request.method in ("GET", "HEAD") else ADMIN
                self.require(request, scope)
        except AuthError as exc:
            return exc.response()
        return await handler(request)


def bearer_token(header: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>`; None if absent, another scheme, not
    ASCII or absurdly long (no token of ours is either)."""
    if header is None or not header.isascii() or len(header) > _MAX_AUTHORIZATION:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_ok(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a token; an unset token refuses everything."""
    if not expected or given is None or not given.isascii():
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


AUTH_KEY: Final = web.AppKey("perkamo_admin_auth", AdminAuth)


def install(app: web.Application, auth: AdminAuth) -> None:
    """Put the auth middleware in front of the app's handlers (and keep it for them)."""
    app[AUTH_KEY] = auth
    app.middlewares.append(auth.middleware)
