"""Counting wrong credentials (tokens, Space links, session cookies) so they cannot be guessed
at speed, without one shared address locking everyone out.

Each wrong credential is counted three ways, over a sliding window:

* per peer address and credential (`per_credential`, 5 a minute): the tight limit. The
  credential is named by a *subject*: a link's signed claims (the token before its MAC), the
  first characters of a typed token. Five bad links through one proxy lock those five links
  from that proxy, not the proxy's other users.
* per credential, from any address (`per_subject`): guesses at one link from many peers are
  still limited. Not used for the admin token (`across_peers=False`): anyone who reaches the
  sign-in page could otherwise lock the admin out.
* per peer address, whatever the credential (`per_peer`): bounds everything one address may
  try. An attempt counts here from the moment it is admitted, *before* its body is read, and
  stops counting only once it proved a good credential or tested none; so holding request
  bodies back cannot get more guesses checked than the limit allows.

In memory, per process; at most `cap` keys are tracked (the least recently used go first).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from consumer.errors import Throttled

_PREFIX_CHARS: Final = 6  # of a typed token: enough to tell tokens apart, too few to matter


@dataclass(slots=True)
class Attempt:
    """One admitted attempt, counted against its peer until it is settled."""

    peer: str
    at: float
    settled: bool = False


def subject_of(kind: str, credential: str, signed: bool = False) -> str:
    """The name a credential is counted under: a hash of its stable part.

    `signed`: a `v1.<claims>.<mac>` token (a link, a cookie), named by everything before the
    MAC, so every guess at one link's MAC counts against that link. Otherwise the first few
    characters of a typed token. Never the credential itself; non-ASCII text is fine."""
    stable = credential.rpartition(".")[0] if signed else credential[:_PREFIX_CHARS]
    digest = hashlib.sha256(stable.encode("utf-8", "backslashreplace")).hexdigest()[:16]
    return f"{kind}:{digest}"


class Throttle:
    """Wrong credentials per peer, per peer and credential, and per credential (see above)."""

    def __init__(self, *, per_credential: int = 5, per_peer: int = 20, per_subject: int = 20,
                 window_s: float = 60.0, cap: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._per_credential = per_credential
        self._per_peer = per_peer
        self._per_subject = per_subject
        self._window_s = window_s
        self._cap = cap
        self._clock = clock
        self._seen: OrderedDict[str, list[float]] = OrderedDict()

    def admit(self, peer: str) -> Attempt:
        """Count an attempt from `peer` before anything of it is read; Throttled when the
        peer's wrong and unsettled attempts already reach `per_peer`."""
        key = _peer_key(peer)
        wait = self._wait(key, self._per_peer)
        if wait > 0:
            raise Throttled(wait)
        attempt = Attempt(peer, self._clock())
        self._add(key, attempt.at)
        return attempt

    def check(self, attempt: Attempt, subject: str, across_peers: bool = True) -> None:
        """Throttled (and the attempt released) when this credential was wrong too often,
        from this peer or, `across_peers`, from all. Call it just before testing the
        credential, with no await in between."""
        wait = self._wait(_pair_key(attempt.peer, subject), self._per_credential)
        if across_peers:
            wait = max(wait, self._wait(_subject_key(subject), self._per_subject))
        if wait > 0:
            self.release(attempt)
            raise Throttled(wait)

    def failed(self, attempt: Attempt, subject: str, across_peers: bool = True) -> None:
        """The credential was wrong: it keeps counting against the peer, and now against the
        credential too."""
        attempt.settled = True
        now = self._clock()
        self._add(_pair_key(attempt.peer, subject), now)
        if across_peers:
            self._add(_subject_key(subject), now)

    def release(self, attempt: Attempt) -> None:
        """The attempt proved a good credential, or tested none: it stops counting."""
        if attempt.settled:
            return
        attempt.settled = True
        times = self._seen.get(_peer_key(attempt.peer))
        if times is not None and attempt.at in times:
            times.remove(attempt.at)

    def retry_after(self, peer: str) -> float:
        """Seconds until `peer` may be admitted again; 0 when it may now."""
        return self._wait(_peer_key(peer), self._per_peer)

    def __len__(self) -> int:
        return len(self._seen)

    def _wait(self, key: str, limit: int) -> float:
        times = self._recent(key)
        if len(times) < limit:
            return 0.0
        return max(0.001, times[-limit] + self._window_s - self._clock())

    def _add(self, key: str, at: float) -> None:
        times = self._recent(key)
        times.append(at)
        self._seen[key] = times[-max(self._per_credential, self._per_peer, self._per_subject):]
        self._seen.move_to_end(key)
        while len(self._seen) > self._cap:
            self._seen.popitem(last=False)

    def _recent(self, key: str) -> list[float]:
        cutoff = self._clock() - self._window_s
        return [t for t in self._seen.get(key, []) if t > cutoff]


def _peer_key(peer: str) -> str:
    return f"peer|{peer}"


def _pair_key(peer: str, subject: str) -> str:
    return f"pair|{peer}|{subject}"


def _subject_key(subject: str) -> str:
    return f"subject|{subject}"
