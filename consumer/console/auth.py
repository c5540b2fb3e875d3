"""Console credentials: signed sessions, Space-scoped links, CSRF tokens, sign-in throttling.

Sessions are stateless: a cookie holds a signed, expiring claim (role, Space, session id), so
any history-role process that shares the key accepts it (several may serve one ClickHouse
server), a restart signs nobody out, and no session table grows with sign-ins. What that
costs: sign-out revokes the session in this process only (its id is remembered until it would
have expired); rotating PERKAMO_CONSOLE_SECRET (or the admin token, when no console secret is
set) revokes every session and link at once. An admin session also carries a fingerprint of
the admin token, so changing the token ends admin sessions even with a console secret set.

Key: HKDF-SHA256 (RFC 5869) over PERKAMO_CONSOLE_SECRET, or over PERKAMO_ADMIN_TOKEN when
that is empty; one sub-key per purpose (session, link, csrf, token fingerprint), so a value
minted for one purpose is never accepted for another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

ROLE_ADMIN: Final = "admin"
ROLE_SPACE: Final = "space"
_SALT: Final = b"perkamo-webhooks console v1"
_VERSION: Final = "v1"
_PURPOSES: Final = ("session", "link", "csrf", "login", "token")
_MAX_TOKEN_CHARS: Final = 2048


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF with SHA-256 (extract, then expand to `length` bytes)."""
    prk = hmac.new(salt or b"\x00" * 32, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    """Who is signed in: the admin (every Space) or one Space's developers."""

    sid: str
    role: str
    space: str  # "" for the admin
    expires: float  # epoch seconds

    @property
    def admin(self) -> bool:
        return self.role == ROLE_ADMIN

    @property
    def scope(self) -> str:
        """The Space every query and action is confined to; "" means every Space (admin)."""
        return "" if self.admin else self.space


@dataclass(frozen=True, slots=True)
class Link:
    """A verified Space-scoped access link."""

    space: str
    expires: float


class Keys:
    """Signs and verifies the console's tokens with keys derived from one secret."""

    def __init__(self, secret: str, admin_token: str, clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise ValueError("a console key needs PERKAMO_CONSOLE_SECRET or PERKAMO_ADMIN_TOKEN")
        self._keys = {p: hkdf_sha256(secret.encode(), _SALT, p.encode()) for p in _PURPOSES}
        self._admin_token = admin_token
        self._clock = clock

    @classmethod
    def from_settings(cls, console_secret: str, admin_token: str) -> Keys | None:
        """None when neither secret is set: the console is off."""
        secret = console_secret or admin_token
        return cls(secret, admin_token) if secret else None

    def _mac(self, purpose: str, text: str) -> str:
        return _b64(hmac.new(self._keys[purpose], text.encode(), hashlib.sha256).digest())

    def _sign(self, purpose: str, claims: dict[str, Any]) -> str:
        body = _b64(orjson.dumps(claims))
        return f"{_VERSION}.{body}.{self._mac(purpose, body)}"

    def _verify(self, purpose: str, token: str) -> dict[str, Any] | None:
        if not token or len(token) > _MAX_TOKEN_CHARS:
            return None
        version, _, rest = token.partition(".")
        body, _, mac = rest.partition(".")
        if version != _VERSION or not hmac.compare_digest(mac, self._mac(purpose, body)):
            return None
        try:
            claims = orjson.loads(_unb64(body))
        except (ValueError, binascii.Error, orjson.JSONDecodeError):
            return None
        if not isinstance(claims, dict):
            return None
        expires = claims.get("exp")
        if not isinstance(expires, int | float) or expires <= self._clock():
            return None
        return claims

    def _token_fingerprint(self) -> str:
        return self._mac("token", self._admin_token)[:16] if self._admin_token else ""

    # Sessions ------------------------------------------------------------------------------

    def new_session(self, role: str, space: str, ttl_s: float, not_after: float | None = None) -> Session:
        expires = self._clock() + ttl_s
        if not_after is not None:
            expires = min(expires, not_after)
        return Session(secrets.token_urlsafe(12), role, space if role == ROLE_SPACE else "", int(expires))

    def session_cookie(self, session: Session) -> str:
        claims: dict[str, Any] = {"sid": session.sid, "role": session.role, "exp": session.expires}
        if session.admin:
            claims["tfp"] = self._token_fingerprint()
        else:
            claims["space"] = session.space
        return self._sign("session", claims)

    def session(self, cookie: str) -> Session | None:
        """The session a cookie carries, or None (forged, expired, or an old admin token)."""
        claims = self._verify("session", cookie)
        if claims is None:
            return None
        sid, role = claims.get("sid"), claims.get("role")
        if not isinstance(sid, str) or role not in (ROLE_ADMIN, ROLE_SPACE):
            return None
        if role == ROLE_ADMIN:
            fingerprint = self._token_fingerprint()
            if not fingerprint or not hmac.compare_digest(str(claims.get("tfp", "")), fingerprint):
                return None
            return Session(sid, role, "", float(claims["exp"]))
        space = claims.get("space")
        if not isinstance(space, str) or not space:
            return None
        return Session(sid, role, space, float(claims["exp"]))

    # Links ---------------------------------------------------------------------------------

    def link_token(self, space: str, ttl_s: float) -> str:
        """A Space-scoped access token, valid for ttl_s seconds."""
        return self._sign("link", {"space": space, "exp": int(self._clock() + ttl_s),
                                   "lid": secrets.token_urlsafe(6)})

    def link(self, token: str) -> Link | None:
        claims = self._verify("link", token)
        if claims is None or not isinstance(claims.get("space"), str) or not claims["space"]:
            return None
        return Link(str(claims["space"]), float(claims["exp"]))

    # CSRF ----------------------------------------------------------------------------------

    def csrf(self, session: Session) -> str:
        """The CSRF token of a session's forms: bound to its id, so another session's is refused."""
        return self._mac("csrf", session.sid)[:32]

    def csrf_ok(self, session: Session, given: str) -> bool:
        return bool(given) and hmac.compare_digest(given, self.csrf(session))

    def login_csrf(self, nonce: str) -> str:
        """The sign-in form's token, bound to the pre-session nonce cookie (login CSRF)."""
        return self._mac("login", nonce)[:32]

    def login_csrf_ok(self, nonce: str, given: str) -> bool:
        return bool(nonce) and bool(given) and hmac.compare_digest(given, self.login_csrf(nonce))

    def admin_token_ok(self, given: str) -> bool:
        """Constant-time check of the admin token (compared as HMACs: no length leak)."""
        if not self._admin_token or not given:
            return False
        return hmac.compare_digest(self._mac("token", given), self._mac("token", self._admin_token))


class Revoked:
    """Session ids signed out in this process, kept until the session would have expired."""

    def __init__(self, cap: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self._ids: OrderedDict[str, float] = OrderedDict()
        self._cap = cap
        self._clock = clock

    def add(self, session: Session) -> None:
        self._prune()
        self._ids[session.sid] = session.expires
        while len(self._ids) > self._cap:
            self._ids.popitem(last=False)

    def __contains__(self, sid: object) -> bool:
        return sid in self._ids

    def _prune(self) -> None:
        now = self._clock()
        for sid in [s for s, exp in self._ids.items() if exp <= now]:
            del self._ids[sid]


class Throttle:
    """Wrong tokens per client address: after `failures` in `window_s`, refuse until it passes.

    In memory and per address (the peer address; behind a proxy every client shares one), with
    a bounded number of addresses tracked.
    """

    def __init__(self, failures: int = 5, window_s: float = 60.0, cap: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._failures = failures
        self._window_s = window_s
        self._cap = cap
        self._clock = clock
        self._seen: OrderedDict[str, list[float]] = OrderedDict()

    def retry_after(self, key: str) -> float:
        """Seconds until `key` may try again; 0 when it may now."""
        times = self._recent(key)
        if len(times) < self._failures:
            return 0.0
        return max(0.0, times[0] + self._window_s - self._clock())

    def failed(self, key: str) -> None:
        times = self._recent(key)
        times.append(self._clock())
        self._seen[key] = times[-self._failures:]
        self._seen.move_to_end(key)
        while len(self._seen) > self._cap:
            self._seen.popitem(last=False)

    def _recent(self, key: str) -> list[float]:
        cutoff = self._clock() - self._window_s
        return [t for t in self._seen.get(key, []) if t > cutoff]
