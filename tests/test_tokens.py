"""Enrollment tokens (hash-only storage, distinct refusal reasons, atomic spending) and the
enrollment rate limiter (sliding window, per source and in total, bounded memory)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from enrollment_harness import FakeClock

from fedge.server import tokens as tokens_mod
from fedge.server.rate_limit import RateLimiter, source_of
from fedge.server.store import SCHEMA_VERSION, Store, StoreError
from fedge.server.tokens import TokenBook, TokenRefused, hash_secret, parse_token


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Store:
    s = Store.open(tmp_path / "fedge.db", clock=clock)
    yield s
    s.close()


@pytest.fixture
def book(store: Store, clock: FakeClock) -> TokenBook:
    return TokenBook(store, clock=clock)


def _spend(store: Store, book: TokenBook, token: str, device_id: str) -> None:
    checked = book.check(token)
    store.enroll_device(
        checked.id, checked.secret_hash, device_id=device_id, name="d", cert_fingerprint=device_id
    )


def test_schema_has_enrollment_tables(store: Store) -> None:
    assert store.schema_version == SCHEMA_VERSION >= 2
    assert store.list_enrollment_tokens() == []


def test_token_is_printed_once_and_stored_as_hash_only(
    book: TokenBook, store: Store, tmp_path: Path
) -> None:
    issued = book.create(ttl_s=60, uses=2, label="lab pis")
    token_id, secret = parse_token(issued.token)
    assert token_id == issued.id and issued.token.startswith("fdg1.")
    assert len(secret) == 43  # 256 random bits
    assert secret not in repr(issued) and issued.token not in repr(issued)
    row = store.get_enrollment_token(issued.id)
    assert row is not None and row.secret_hash == hash_secret(token_id, secret)
    assert (row.label, row.max_uses, row.uses, row.revoked) == ("lab pis", 2, 0, False)
    store.close()
    for f in tmp_path.glob("fedge.db*"):  # database, WAL and shared-memory files
        assert secret.encode() not in f.read_bytes()


def test_two_tokens_differ(book: TokenBook) -> None:
    a, b = book.create(), book.create()
    assert a.id != b.id and a.token != b.token


def test_check_accepts_a_live_token(book: TokenBook) -> None:
    issued = book.create(ttl_s=60)
    checked = book.check(issued.token)
    assert checked.id == issued.id
    assert checked.secret_hash not in repr(checked)
    assert book.check("  " + issued.token + "\n").id == issued.id  # pasted with whitespace


@pytest.mark.parametrize(
    "bad",
    ["", "fdg1", "fdg1..", "fdg2.0123456789abcdef." + "A" * 43, "x" * 5000, "fdg1.0123.abc"],
)
def test_malformed_tokens_are_refused(book: TokenBook, bad: str) -> None:
    with pytest.raises(TokenRefused) as e:
        book.check(bad)
    assert e.value.reason == "malformed"


def test_refusal_reasons_are_distinct(book: TokenBook, store: Store, clock: FakeClock) -> None:
    issued = book.create(ttl_s=60)
    token_id, secret = parse_token(issued.token)
    wrong_secret = f"fdg1.{token_id}.{'B' * 43}"
    unknown_id = f"fdg1.{'f' * 16}.{secret}"
    reasons = {}
    for label, token in (("wrong", wrong_secret), ("unknown", unknown_id)):
        with pytest.raises(TokenRefused) as e:
            book.check(token)
        reasons[label] = e.value.reason
        assert secret not in str(e.value) and "B" * 43 not in str(e.value)
    clock.now += 61
    with pytest.raises(TokenRefused) as e:
        book.check(issued.token)
    reasons["expired"] = e.value.reason
    clock.now -= 61
    book.revoke(issued.id)
    with pytest.raises(TokenRefused) as e:
        book.check(issued.token)
    reasons["revoked"] = e.value.reason
    assert reasons == {
        "wrong": "wrong",
        "unknown": "unknown",
        "expired": "expired",
        "revoked": "revoked",
    }


def test_comparison_is_constant_time(book: TokenBook, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real = tokens_mod.hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens_mod.hmac, "compare_digest", spy)
    issued = book.create()
    book.check(issued.token)
    with pytest.raises(TokenRefused):
        book.check(f"fdg1.{'e' * 16}.{'C' * 43}")  # unknown id: compared too, same cost
    assert len(calls) == 2


def test_one_time_token_is_spent_once(book: TokenBook, store: Store) -> None:
    issued = book.create(uses=1)
    _spend(store, book, issued.token, "dev-a")
    with pytest.raises(TokenRefused) as e:
        book.check(issued.token)
    assert e.value.reason == "used_up"
    # even a caller that checked before the use was spent cannot spend it again
    row = store.get_enrollment_token(issued.id)
    with pytest.raises(StoreError) as se:
        store.enroll_device(
            issued.id, row.secret_hash, device_id="dev-b", name="d", cert_fingerprint="fp-b"
        )
    assert se.value.reason == "token_refused"
    assert [d.id for d in store.list_devices()] == ["dev-a"]
    assert store.get_device("dev-a").enrolled_with == issued.id


def test_multi_use_token_counts_uses(book: TokenBook, store: Store) -> None:
    issued = book.create(uses=3)
    for i in range(3):
        _spend(store, book, issued.token, f"dev-{i}")
    assert store.get_enrollment_token(issued.id).uses == 3
    with pytest.raises(TokenRefused, match="used_up"):
        book.check(issued.token)


def test_expiry_is_enforced_by_the_store_too(book: TokenBook, store: Store, clock: FakeClock):
    issued = book.create(ttl_s=10)
    checked = book.check(issued.token)
    clock.now += 11  # expired between check and spend
    with pytest.raises(StoreError, match="token_refused"):
        store.enroll_device(
            checked.id, checked.secret_hash, device_id="d", name="d", cert_fingerprint="f"
        )
    assert store.list_devices() == [] and store.get_enrollment_token(issued.id).uses == 0


def test_failed_enrollment_spends_nothing(book: TokenBook, store: Store) -> None:
    issued = book.create(uses=2)
    _spend(store, book, issued.token, "dev-a")
    checked = book.check(issued.token)
    with pytest.raises(StoreError, match="exists"):  # the device insert fails: roll back the use
        store.enroll_device(
            checked.id, checked.secret_hash, device_id="dev-a", name="d", cert_fingerprint="f2"
        )
    assert store.get_enrollment_token(issued.id).uses == 1


def test_racing_enrollments_spend_a_one_time_token_once(tmp_path: Path) -> None:
    """Eight threads with their own connections race for one use: exactly one wins."""
    path = tmp_path / "race.db"
    with Store.open(path) as s:
        issued = TokenBook(s).create(uses=1)
        checked = TokenBook(s).check(issued.token)
    wins: list[str] = []
    barrier = threading.Barrier(8)

    def racer(i: int) -> None:
        with Store.open(path) as s:
            barrier.wait()
            try:
                s.enroll_device(
                    checked.id,
                    checked.secret_hash,
                    device_id=f"dev-{i}",
                    name="d",
                    cert_fingerprint=f"fp-{i}",
                )
                wins.append(f"dev-{i}")
            except StoreError:
                pass

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with Store.open(path) as s:
        assert len(wins) == 1 and [d.id for d in s.list_devices()] == wins
        assert s.get_enrollment_token(checked.id).uses == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ttl_s": 0}, "ttl"),
        ({"ttl_s": -5}, "ttl"),
        ({"uses": 0}, "uses"),
        ({"label": "a\nb"}, "label"),
        ({"label": "x" * 500}, "label"),
    ],
)
def test_create_refuses_bad_parameters(book: TokenBook, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        book.create(**kwargs)


def test_revoke_unknown_token(book: TokenBook) -> None:
    with pytest.raises(KeyError):
        book.revoke("0" * 16)


# -- rate limiter --------------------------------------------------------------


def test_rate_limiter_caps_each_source_in_a_sliding_window() -> None:
    clock = FakeClock(0.0)
    rl = RateLimiter(per_source=3, total=100, window_s=10, clock=clock)
    allowed = []
    for t in (0.0, 1.0, 2.0, 3.0):
        clock.now = t
        allowed.append(rl.allow("a"))
    assert allowed == [True, True, True, False]
    assert rl.allow("b")  # another source has its own budget
    clock.now = 9.9
    assert not rl.allow("a")  # still inside the window of the first attempt
    clock.now = 10.1
    assert rl.allow("a") and not rl.allow("a")  # one attempt slid out: one slot came back


def test_rate_limiter_global_cap_holds_across_sources() -> None:
    clock = FakeClock(0.0)
    rl = RateLimiter(per_source=5, total=4, window_s=10, clock=clock)
    assert [rl.allow(f"10.0.0.{i}") for i in range(6)] == [True] * 4 + [False] * 2
    clock.now = 10.5
    assert rl.allow("10.0.0.99")


def test_rate_limiter_refusals_are_not_counted() -> None:
    clock = FakeClock(0.0)
    rl = RateLimiter(per_source=2, total=100, window_s=10, clock=clock)
    rl.allow("a")
    clock.now = 5
    rl.allow("a")
    for _ in range(50):  # hammering while refused does not extend the ban
        assert not rl.allow("a")
    clock.now = 10.5
    assert rl.allow("a")


def test_rate_limiter_memory_is_bounded() -> None:
    rl = RateLimiter(per_source=3, total=10**9, window_s=60, max_sources=100)
    for i in range(10_000):
        rl.allow(f"src-{i}")
    assert rl.tracked_sources == 100
    assert all(len(log) <= 3 for log in rl._by_source.values())


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("ipv4:10.1.2.3:5555", "10.1.2.3"),
        ("ipv6:[2001:db8::1]:5555", "2001:db8::/64"),
        ("ipv6:[2001:db8::ffff:1]:1", "2001:db8::/64"),
        ("ipv6:[::ffff:10.0.0.7]:1", "10.0.0.7"),
        ("unix:/tmp/sock", "unix:/tmp/sock"),
    ],
)
def test_source_of(peer: str, key: str) -> None:
    assert source_of(peer) == key


def test_audit_redacts_fields_that_could_hold_secrets(caplog: pytest.LogCaptureFixture) -> None:
    from fedge.server.audit import audit

    caplog.set_level("INFO", logger="fedge.audit")
    audit("probe", token="fdg1.leak", private_key="KEYLEAK", csr_pem="CSRLEAK", token_id="t-1")
    assert "probe" in caplog.text and "t-1" in caplog.text
    for leak in ("fdg1.leak", "KEYLEAK", "CSRLEAK"):
        assert leak not in caplog.text
