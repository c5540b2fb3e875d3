"""consumer.throttle (wrong credentials counted per peer, per peer and credential, per
credential) and the console's sign-out cut-offs and non-ASCII handling (consumer.console.auth)."""

from __future__ import annotations

import pytest

from consumer.console.auth import ROLE_ADMIN, ROLE_SPACE, Keys, SignOuts
from consumer.errors import Throttled
from consumer.throttle import Throttle, subject_of

SECRET = "k" * 40


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _fail(throttle: Throttle, peer: str, subject: str, across_peers: bool = True) -> None:
    attempt = throttle.admit(peer)
    throttle.check(attempt, subject, across_peers)
    throttle.failed(attempt, subject, across_peers)


# Throttle ----------------------------------------------------------------------------------


def test_per_credential_limit_at_the_limit_and_one_past_it() -> None:
    clock = Clock()
    throttle = Throttle(clock=clock)
    for _ in range(5):
        _fail(throttle, "proxy", "link:a")
    attempt = throttle.admit("proxy")  # the address is not over its own limit...
    with pytest.raises(Throttled) as caught:
        throttle.check(attempt, "link:a")  # ...but this link from it is
    assert 1 <= caught.value.retry_after <= 61
    clock.now += 60.5
    _fail(throttle, "proxy", "link:a")  # the window passed


def test_one_proxys_bad_links_do_not_lock_its_other_users_out() -> None:
    throttle = Throttle()
    for n in range(5):
        _fail(throttle, "proxy", f"link:bad{n}")
    attempt = throttle.admit("proxy")
    throttle.check(attempt, "link:good")  # not raised
    throttle.release(attempt)


def test_guesses_at_one_link_from_many_peers_are_limited() -> None:
    throttle = Throttle()
    for n in range(20):
        _fail(throttle, f"10.0.0.{n}", "link:target")
    attempt = throttle.admit("10.0.1.1")  # a fresh address...
    with pytest.raises(Throttled):
        throttle.check(attempt, "link:target")  # ...still waits for this link
    attempt = throttle.admit("10.0.1.1")
    throttle.check(attempt, "link:other")
    # The admin token is not limited across peers: anyone could lock the admin out.
    for n in range(25):
        _fail(throttle, f"10.0.2.{n}", "admin:x", across_peers=False)
    throttle.check(throttle.admit("10.0.3.1"), "admin:x", across_peers=False)


def test_an_attempt_counts_before_its_body_is_read() -> None:
    # Forty sign-ins whose bodies are held back: only the peer's limit gets admitted at all.
    throttle = Throttle()
    admitted = []
    refused = 0
    for _ in range(40):
        try:
            admitted.append(throttle.admit("proxy"))
        except Throttled:
            refused += 1
    assert (len(admitted), refused) == (20, 20)
    checked = 0
    for attempt in admitted:  # the bodies arrive: one credential, checked only 5 times
        try:
            throttle.check(attempt, "admin:guess", across_peers=False)
        except Throttled:
            continue
        checked += 1
        throttle.failed(attempt, "admin:guess", across_peers=False)
    assert checked == 5


def test_a_good_or_untested_attempt_stops_counting() -> None:
    throttle = Throttle()
    for _ in range(100):
        attempt = throttle.admit("proxy")
        throttle.release(attempt)
        throttle.release(attempt)  # twice is harmless
    assert throttle.retry_after("proxy") == 0
    for _ in range(20):
        throttle.admit("proxy")  # admitted, never settled (bodies still held)
    assert throttle.retry_after("proxy") > 0


def test_tracked_keys_are_bounded() -> None:
    throttle = Throttle(cap=100)
    for n in range(1_000):
        _fail(throttle, f"peer{n}", f"link:{n}")
    assert len(throttle) <= 100


def test_subjects_name_the_stable_part_never_the_credential() -> None:
    link = "v1.claims.mac-one"
    assert subject_of("link", link, signed=True) == subject_of("link", "v1.claims.mac-two", signed=True)
    assert subject_of("link", link, signed=True) != subject_of("link", "v1.other.mac-one", signed=True)
    assert "claims" not in subject_of("link", link, signed=True)
    assert subject_of("admin", "abcdef-one") == subject_of("admin", "abcdef-two")
    for odd in ("tök", "\udcff\udcfe", "\ud800", ""):  # any text: a name, never an exception
        assert subject_of("cookie", odd, signed=True).startswith("cookie:")


# Sign-out cut-offs -------------------------------------------------------------------------


def test_sign_out_cannot_be_flushed_by_cycling_sign_ins() -> None:
    # Measured: the last 10,000 revoked ids were kept; one link cycled 300+ sign-ins a second.
    clock = Clock()
    keys = Keys(SECRET, "", clock=clock)
    signed_out = SignOuts(keep_s=8 * 3600, clock=clock)
    link = keys.link(keys.link_token("shop", 86400))
    assert link is not None and link.id
    first = keys.new_session(ROLE_SPACE, link.space, 8 * 3600, not_after=link.expires, link_id=link.id)
    cookie = keys.session_cookie(first)
    clock.now += 0.001
    signed_out.sign_out(first)
    for _ in range(20_000):
        clock.now += 0.001
        session = keys.new_session(ROLE_SPACE, link.space, 8 * 3600, link_id=link.id)
        assert not signed_out.refused(session)
        clock.now += 0.001
        signed_out.sign_out(session)
    again = keys.session(cookie)
    assert again is not None and signed_out.refused(again)
    assert len(signed_out) == 1  # bounded whatever the sign-in rate
    clock.now += 0.001
    assert not signed_out.refused(keys.new_session(ROLE_SPACE, "shop", 60, link_id=link.id))


def test_sign_out_ends_its_links_sessions_and_no_one_elses() -> None:
    clock = Clock()
    keys = Keys(SECRET, "admin-" + "a" * 40, clock=clock)
    signed_out = SignOuts(keep_s=3600, cap=10, clock=clock)
    one = keys.new_session(ROLE_SPACE, "shop", 3600, link_id="L1")
    same_link = keys.new_session(ROLE_SPACE, "shop", 3600, link_id="L1")
    other_link = keys.new_session(ROLE_SPACE, "shop", 3600, link_id="L2")
    admin_a = keys.new_session(ROLE_ADMIN, "", 3600)
    admin_b = keys.new_session(ROLE_ADMIN, "", 3600)
    clock.now += 1
    signed_out.sign_out(one)
    signed_out.sign_out(admin_a)
    assert signed_out.refused(one) and signed_out.refused(same_link)  # the link's generation moved
    assert not signed_out.refused(other_link)
    assert signed_out.refused(admin_a) and not signed_out.refused(admin_b)
    # Once every session issued before them has expired, sign-outs are forgotten when room
    # is needed, without the fail-closed cut-off for everyone.
    clock.now += 3601
    for n in range(8):
        signed_out.sign_out(keys.new_session(ROLE_SPACE, "shop", 3600, link_id=f"fresh{n}"))
    alive = keys.new_session(ROLE_SPACE, "shop", 3600, link_id="alive")
    clock.now += 1
    signed_out.sign_out(keys.new_session(ROLE_ADMIN, "", 60))
    assert len(signed_out) == 9  # 2 forgotten, 8 + 1 kept
    assert not signed_out.refused(alive)


def test_more_sign_outs_than_kept_refuse_everything_older() -> None:
    clock = Clock()
    keys = Keys(SECRET, "admin-" + "a" * 40, clock=clock)
    signed_out = SignOuts(keep_s=3600, cap=100, clock=clock)
    early = keys.new_session(ROLE_SPACE, "shop", 3600, link_id="early")
    signed_out.sign_out(early)
    for n in range(150):
        clock.now += 0.01
        signed_out.sign_out(keys.new_session(ROLE_ADMIN, "", 3600))
        assert len(signed_out) <= 100, n
    assert signed_out.refused(early)  # failed closed: nothing signed out came back
    clock.now += 0.01
    assert not signed_out.refused(keys.new_session(ROLE_SPACE, "shop", 60, link_id="new"))


# Keys: any text answers no ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ["tök", "v1.\udcff\udcfe.x", "v1.é.é", "\x00", "v1." + "é" * 3000])
def test_non_ascii_credentials_are_refused_without_an_exception(text: str) -> None:
    keys = Keys(SECRET, "admin-" + "a" * 40)
    session = keys.new_session(ROLE_ADMIN, "", 60)
    assert keys.session(text) is None
    assert keys.link(text) is None
    assert not keys.admin_token_ok(text)
    assert not keys.csrf_ok(session, text)
    assert not keys.login_csrf_ok(text, text)
    assert not keys.login_csrf_ok("nonce", text)


def test_a_cookie_from_before_the_cut_offs_is_refused() -> None:
    # Cookies minted before sign-out cut-offs carry no `iat`: sign in again, once.
    keys = Keys(SECRET, "admin-" + "a" * 40)
    old = keys._sign("session", {"sid": "s", "role": "space", "space": "shop",  # noqa: SLF001
                                 "exp": 2_000_000_000})
    assert keys.session(old) is None
    new = keys.session_cookie(keys.new_session(ROLE_SPACE, "shop", 60, link_id="L"))
    session = keys.session(new)
    assert session is not None and session.link == "L" and session.subject == "link:L"
