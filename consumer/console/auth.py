"""Console credentials: signed sessions, Space-scoped links, CSRF tokens, sign-in throttling.

Sessions are stateless: a cookie holds a signed, expiring claim (role, Space, session id, the
link it was opened with, when it was issued), so any history-role process that shares the key
accepts it (several may serve one ClickHouse server), a restart signs nobody out, and no
session table grows with sign-ins. Sign-out is a cut-off, not a list of ids (`SignOuts`):
signing out of a Space session ends every session opened with the same link until then (the
link's generation moves on), signing out as the admin ends that admin session; memory grows
with the links and admin sessions signed out, never with the sign-in rate, so cycling
sign-ins cannot flush it. It holds in this process only, until a restart. Rotating
PERKAMO_CONSOLE_SECRET (or the admin token, when no console secret is set) revokes every
session and link at once. An admin session also carries a fingerprint of the admin token, so
changing the token ends admin sessions even with a console secret set.

Every check here takes any text (non-ASCII included) and answers no, never an exception.

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


def _ascii_equal(given: str, expected: str) -> bool:
    """Constant-time equality that answers False (never TypeError) for non-ASCII input."""
    return given.isascii() and hmac.compare_digest(given, expected)


@dataclass(frozen=True, slots=True)
class Session:
    """Who is signed in: the admin (every Space) or one Space's developers."""

    sid: str
    role: str
    space: str  # "" for the admin
    expires: float  # epoch seconds
    issued: float = 0.0  # epoch seconds
    link: str = ""  # the id of the link a Space session was opened with

    @property
    def admin(self) -> bool:
        return self.role == ROLE_ADMIN

    @property
    def subject(self) -> str:
        """What a sign-out ends: every session of the same link (or Space, for a session made
        without one), or this one admin session."""
        if self.admin:
            return f"admin:{self.sid}"
        return f"link:{self.link}" if self.link else f"space:{self.space}"

    @property
    def scope(self) -> str:
        """The Space every query and action is confined to; "" means every Space (admin)."""
        return "" if self.admin else self.space


@dataclass(frozen=True, slots=True)
class Link:
    """A verified Space-scoped access link."""

    space: str
    expires: float
    id: str = ""


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
        if not token or len(token) > _MAX_TOKEN_CHARS or not token.isascii():
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

    def new_session(self, role: str, space: str, ttl_s: float, not_after: float | None = None,
                    link_id: str = "") -> Session:
        now = self._clock()
        expires = now + ttl_s
        if not_after is not None:
            expires = min(expires, not_after)
        space_session = role == ROLE_SPACE
        return Session(secrets.token_urlsafe(12), role, space if space_session else "",
                       int(expires), round(now, 6), link_id if space_session else "")

    def session_cookie(self, session: Session) -> str:
        claims: dict[str, Any] = {"sid": session.sid, "role": session.role, "exp": session.expires,
                                  "iat": session.issued}
        if session.admin:
            claims["tfp"] = self._token_fingerprint()
        else:
            claims["space"] = session.space
            claims["lid"] = session.link
        return self._sign("session", claims)

    def session(self, cookie: str) -> Session | None:
        """The session a cookie carries, or None (forged, expired, or an old admin token)."""
        claims = self._verify("session", cookie)
        if claims is None:
            return None
        sid, role, issued = claims.get("sid"), claims.get("role"), claims.get("iat")
        # A cookie without `iat` predates sign-out cut-offs: it is refused (sign in again).
        if not isinstance(sid, str) or role not in (ROLE_ADMIN, ROLE_SPACE) \
                or not isinstance(issued, int | float):
            return None
        if role == ROLE_ADMIN:
            fingerprint = self._token_fingerprint()
            if not fingerprint or not _ascii_equal(str(claims.get("tfp", "")), fingerprint):
                return None
            return Session(sid, role, "", float(claims["exp"]), float(issued))
        space, link = claims.get("space"), claims.get("lid", "")
        if not isinstance(space, str) or not space or not isinstance(link, str):
            return None
        return Session(sid, role, space, float(claims["exp"]), float(issued), link)

    # Links ---------------------------------------------------------------------------------

    def link_token(self, space: str, ttl_s: float) -> str:
        """A Space-scoped access token, valid for ttl_s seconds."""
        return self._sign("link", {"space": space, "exp": int(self._clock() + ttl_s),
                                   "lid": secrets.token_urlsafe(6)})

    def link(self, token: str) -> Link | None:
        claims = self._verify("link", token)
        if claims is None or not isinstance(claims.get("space"), str) or not claims["space"]:
            return None
        return Link(str(claims["space"]), float(claims["exp"]), str(claims.get("lid", "")))

    # CSRF ----------------------------------------------------------------------------------

    def csrf(self, session: Session) -> str:
        """The CSRF token of a session's forms: bound to its id, so another session's is refused."""
        return self._mac("csrf", session.sid)[:32]

    def csrf_ok(self, session: Session, given: str) -> bool:
        return bool(given) and _ascii_equal(given, self.csrf(session))

    def login_csrf(self, nonce: str) -> str:
        """The sign-in form's token, bound to the pre-session nonce cookie (login CSRF)."""
        return self._mac("login", nonce)[:32]

    def login_csrf_ok(self, nonce: str, given: str) -> bool:
        return (bool(nonce) and bool(given) and nonce.isascii()
                and _ascii_equal(given, self.login_csrf(nonce)))

    def admin_token_ok(self, given: str) -> bool:
        """Constant-time check of the admin token (compared as HMACs: no length leak)."""
        if not self._admin_token or not given or not given.isascii():
            return False
        return hmac.compare_digest(self._mac("token", given), self._mac("token", self._admin_token))


class SignOuts:
    """Sign-outs in this process, as cut-offs: a session is refused when its subject (its link,
    or the admin session itself) signed out at or after the session was issued.

    One entry per subject, kept `keep_s` (the longest a session lives) after its sign-out: no
    session issued before then is alive later. More than `cap` subjects at once (only minted
    links and admin sign-ins make subjects) turns the entries into one cut-off for every
    session issued so far: memory stays bounded and nothing signed out comes back."""

    def __init__(self, keep_s: float, cap: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self._keep_s = keep_s
        self._cap = cap
        self._clock = clock
        self._cutoffs: dict[str, tuple[float, float]] = {}  # subject -> (cut-off, forget at)
        self._floor = 0.0

    def sign_out(self, session: Session) -> None:
        now = self._clock()
        cutoff = max(now, session.issued)
        if len(self._cutoffs) >= self._cap:
            self._prune(now)
        self._cutoffs[session.subject] = (cutoff, now + self._keep_s)
        if len(self._cutoffs) > self._cap:
            self._floor, self._cutoffs = max(self._floor, cutoff), {}

    def refused(self, session: Session) -> bool:
        if session.issued <= self._floor:
            return True
        entry = self._cutoffs.get(session.subject)
        return entry is not None and session.issued <= entry[0]

    def __len__(self) -> int:
        return len(self._cutoffs)

    def _prune(self, now: float) -> None:
        for subject in [s for s, (_, forget) in self._cutoffs.items() if forget <= now]:
            del self._cutoffs[subject]
