"""Basic auth under many logins (issue 10, item 7): one bcrypt at a time, results of
recent checks cached for a short time, failures unable to evict good credentials."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable

import bcrypt
import pytest

from exporter.webconfig import (
    AUTH_CACHE_TTL,
    _AuthCache,
    _successes,
    check_basic_auth,
    parse_web_config,
)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class _Spy:
    """Wraps the real bcrypt.checkpw: how often it ran, and how many ran at once."""

    def __init__(self, real: Callable[[bytes, bytes], bool]) -> None:
        self._real = real
        self._lock = threading.Lock()
        self.calls = 0
        self.running = 0
        self.most_at_once = 0

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            return self._real(password, hashed)
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    found = _Spy(bcrypt.checkpw)
    monkeypatch.setattr(bcrypt, "checkpw", found)
    return found


def test_concurrent_logins_run_one_bcrypt_at_a_time(spy: _Spy) -> None:
    # Cost 8: long enough (tens of milliseconds) that parallel runs would overlap.
    cfg = parse_web_config({"basic_auth_users": {"alice": _hash(b"pw", 8)}})
    barrier = threading.Barrier(8)

    def login(n: int) -> None:
        barrier.wait()
        assert not check_basic_auth(cfg, basic("alice", f"wrong-{n}"))

    threads = [threading.Thread(target=login, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert spy.calls == 8
    assert spy.most_at_once == 1


def test_a_repeated_unknown_user_costs_one_bcrypt(spy: _Spy) -> None:
    cfg = parse_web_config({"basic_auth_users": {"alice": _hash(b"pw", 4)}})
    for _ in range(5):
        assert not check_basic_auth(cfg, basic("mallory", "guess"))
    assert spy.calls == 1


def test_wrong_passwords_cannot_evict_good_credentials(spy: _Spy) -> None:
    cfg = parse_web_config({"basic_auth_users": {"alice": _hash(b"pw", 4)}})
    assert check_basic_auth(cfg, basic("alice", "pw"))
    guesses = 2 * _successes.size
    for n in range(guesses):
        assert not check_basic_auth(cfg, basic("alice", f"guess-{n}"))
    assert check_basic_auth(cfg, basic("alice", "pw"))
    assert spy.calls == 1 + guesses


def test_cached_results_expire() -> None:
    cache = _AuthCache(size=4, ttl=0.05)
    cache.add(b"key")
    assert b"key" in cache
    deadline = time.monotonic() + 10
    while b"key" in cache:
        assert time.monotonic() < deadline, "the entry never expired"
        time.sleep(0.01)
    assert 0 < AUTH_CACHE_TTL <= 300  # "a short time"


def test_the_cache_is_bounded() -> None:
    cache = _AuthCache(size=3, ttl=60)
    for n in range(5):
        cache.add(bytes([n]))
    assert [bytes([n]) in cache for n in range(5)] == [False, False, True, True, True]


def _hash(password: bytes, cost: int) -> str:
    return bcrypt.hashpw(password, bcrypt.gensalt(cost)).decode()
