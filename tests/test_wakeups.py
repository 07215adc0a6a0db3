"""Wake-up messages are coalesced through a flag in the Redis broker: while one
round waits to start, commits queue no more, and no commit goes unclaimed."""

import time
from typing import Any

import pytest
import redis

from delivery import engine, tasks, wakeups

from .system_fixtures import RedisServer, free_port


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the wake-up messages, instead of sending them to a broker."""
    messages: list[int] = []
    monkeypatch.setattr(tasks.send_due, "delay", lambda: messages.append(1))
    monkeypatch.setattr(wakeups, "_clients", {})
    return messages


@pytest.fixture
def broker(redis_server: RedisServer, settings: Any) -> redis.Redis:
    settings.CELERY_BROKER_URL = redis_server.url
    settings.DELIVERY_WAKE_TASKS = 2
    return redis.Redis.from_url(redis_server.url)


def test_wake_up_waits_for_queued(broker: redis.Redis, queued: list[int]) -> None:
    tasks.wake_workers()
    tasks.wake_workers()
    tasks.wake_workers(1)

    # One round of DELIVERY_WAKE_TASKS. The later commits rely on its claims.
    assert len(queued) == 2
    assert broker.exists(wakeups.FLAG_KEY)


def test_task_clears_flag_before_claim(
    broker: redis.Redis, queued: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    flag_when_claiming: list[int] = []

    def drain(*arguments: Any, **options: Any) -> bool:
        flag_when_claiming.append(broker.exists(wakeups.FLAG_KEY))
        return False

    monkeypatch.setattr(engine, "drain", drain)
    tasks.wake_workers(1)

    tasks.send_due()
    # A commit after the task started may be missed by its claim: it wakes again.
    tasks.wake_workers(1)

    assert flag_when_claiming == [0]
    assert len(queued) == 2


def test_flag_expires(
    broker: redis.Redis, queued: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wakeups, "FLAG_SECONDS", 0.05)
    tasks.wake_workers(1)
    time.sleep(0.2)

    # As if the first message was lost: a later commit wakes workers again.
    tasks.wake_workers(1)

    assert len(queued) == 2


def test_failed_queueing_clears_flag(
    broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wakeups, "_clients", {})
    attempts: list[int] = []

    def delay() -> None:
        attempts.append(1)
        raise ConnectionError("the broker is down")

    monkeypatch.setattr(tasks.send_due, "delay", delay)
    tasks.wake_workers(1)
    tasks.wake_workers(1)

    assert len(attempts) == 2
    assert not broker.exists(wakeups.FLAG_KEY)


def test_other_brokers_queue_every_wake(queued: list[int], settings: Any) -> None:
    settings.CELERY_BROKER_URL = "filesystem://"
    settings.DELIVERY_WAKE_TASKS = 2

    tasks.wake_workers(1)
    tasks.wake_workers(1)

    assert len(queued) == 2


def test_unreachable_redis_queues_anyway(queued: list[int], settings: Any) -> None:
    # Nothing listens on this port: the flag cannot be set, so the wake-up goes.
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port('127.0.0.1')}/0"

    tasks.wake_workers(1)
    tasks.wake_workers(1)

    assert len(queued) == 2


def test_url_option_redis_rejects_wakes(
    redis_server: RedisServer,
    settings: Any,
    queued: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Kombu reads heartbeat from the URL, but redis-py's connection rejects it.
    settings.CELERY_BROKER_URL = f"{redis_server.url}?heartbeat=10"
    drained: list[int] = []

    def drain(*arguments: Any, **options: Any) -> bool:
        drained.append(1)
        return False

    monkeypatch.setattr(engine, "drain", drain)
    tasks.wake_workers(1)
    tasks.send_due()

    # The wake-up is queued, and the task claims, as without the flag.
    assert len(queued) == 1
    assert drained == [1]
