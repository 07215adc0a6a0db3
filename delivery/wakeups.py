"""Coalescing wake-up messages, so that at most one round of them waits in the broker.

Every commit that makes deliveries due queues a wake-up task. Under load the workers
are busy, and their drain loop claims the new deliveries anyway: each wake-up queued
meanwhile only makes a worker run a claim that finds nothing. With a Redis broker, a
flag in Redis marks that wake-ups are queued and none of them has started. While it
is set, no more are queued.

A task clears the flag as it starts, before it claims. That claim reads every commit
made before the clear. A commit made after it finds the flag clear and queues a new
wake-up. The flag expires after FLAG_SECONDS in case its messages are lost, and the
sweep wakes workers as well. With another broker every wake-up is queued.
"""

import logging
import os

import redis
from django.conf import settings

logger = logging.getLogger(__name__)

FLAG_KEY = "delivery:wake-up-queued"
FLAG_SECONDS = 1.0
# A wake-up must not wait long on Redis. Without a reply, it is queued anyway.
REDIS_TIMEOUT_SECONDS = 0.5

_clients: dict[tuple[str, int], "redis.Redis | None"] = {}


def _client() -> "redis.Redis | None":
    """Return a Redis client for the broker's server, or None when the broker is
    not Redis. One per broker URL and process: a forked worker opens its own."""
    url = settings.CELERY_BROKER_URL
    key = (url, os.getpid())
    if key not in _clients:
        client = None
        if url.startswith(("redis://", "rediss://")):
            client = redis.Redis.from_url(
                url,
                socket_timeout=REDIS_TIMEOUT_SECONDS,
                socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            )
        _clients[key] = client
    return _clients[key]


def claim_turn() -> bool:
    """Return whether the caller should queue wake-ups now, and if so mark them as
    queued. False means that queued ones have not started yet, so they will claim
    what the caller committed."""
    # Any error, not only RedisError. redis-py rejects some broker URLs that Kombu
    # accepts, such as one with ?heartbeat=10, with a TypeError at the first command.
    try:
        client = _client()
        if client is None:
            return True
        return bool(client.set(FLAG_KEY, 1, nx=True, px=round(FLAG_SECONDS * 1000)))
    except Exception as error:
        logger.info(
            "Setting the wake-up flag failed, so wake-ups are queued: %s", error
        )
        return True


def clear() -> None:
    """Clear the flag: a task has started, or queueing a wake-up failed."""
    try:
        client = _client()
        if client is None:
            return
        client.delete(FLAG_KEY)
    except Exception as error:
        # It expires after FLAG_SECONDS. Until then, commits rely on the claims of
        # the queued tasks and on the sweep.
        logger.info("Clearing the wake-up flag failed: %s", error)
