"""Celery tasks: thin wrappers that carry no data and leave the work to the engine.

A task message only wakes a worker. Losing one delays delivery until the next sweep;
running one twice is harmless, because deliveries are claimed from the database.
"""

import gc
import logging
import os
from functools import partial
from typing import Any

from celery import shared_task
from celery.concurrency import get_implementation
from celery.concurrency.solo import TaskPool as SoloPool
from celery.signals import worker_init, worker_process_init, worker_ready
from django.conf import settings

from . import engine, health, wakeups

logger = logging.getLogger(__name__)

# The number of processes in this worker's pool, set when the worker starts. Each
# claim takes this share of the due keys, so that the other processes can send the
# rest.
pool_size = 1


@worker_init.connect
def _remember_pool_size(sender: Any, **kwargs: Any) -> None:
    global pool_size
    # The solo pool runs one task at a time in the worker's own process, whatever
    # its concurrency is set to, so no sibling takes the keys a claim leaves.
    # The pool is a name or a class here: Celery resolves it after this signal.
    pool = getattr(sender, "pool_cls", None)
    if pool is not None and get_implementation(pool) is SoloPool:
        pool_size = 1
        return
    concurrency = getattr(sender, "concurrency", None)
    # "auto" is resolved later; the number of CPUs is what it resolves to unless
    # a cgroup quota is lower.
    pool_size = concurrency if isinstance(concurrency, int) else os.cpu_count() or 1


@worker_process_init.connect
@worker_ready.connect
def _freeze_startup_objects(**kwargs: Any) -> None:
    """Move the objects that exist once a worker process has started (modules,
    settings, Django's app registry) out of the garbage collector's generations.

    They live as long as the process, and each full collection walked them all
    again. Claims build thousands of short-lived objects per second, which set off
    such collections. worker_process_init runs in each process of a prefork pool,
    worker_ready in the worker's main process, which runs tasks with the solo and
    threads pools. Garbage is collected first, so that none is kept for good.
    """
    gc.collect()
    gc.freeze()


@shared_task(acks_late=True, ignore_result=True)
def send_due() -> None:
    """Send due deliveries until none is left or this round's budget is spent."""
    # Before claiming, so that a commit after this point queues a new wake-up
    # (wakeups.py).
    wakeups.clear()
    # A full claim means a backlog: another worker can take the keys this one left.
    if engine.drain(
        engine.worker_name(),
        settings.DELIVERY_DRAIN_SECONDS,
        on_backlog=partial(wake_workers, 1),
        share=pool_size,
    ):
        # Queue the next round instead of looping here, so one busy destination
        # cannot hold this worker process forever.
        send_due.delay()


@shared_task(acks_late=True, ignore_result=True)
def sweep() -> None:
    """Periodic: reclaim deliveries of vanished workers, release held deliveries of
    active destinations, queue unfinished bulk jobs again, disable destinations that
    keep failing, and wake workers when deliveries are due."""
    from . import bulk

    engine.release_expired_leases()
    health.release_stray_held()
    bulk.requeue_unfinished()
    health.sweep_failing_destinations()
    if engine.has_due_work():
        wake_workers()


@shared_task(acks_late=True, ignore_result=True)
def run_bulk_job(job_id: int) -> None:
    """Do a staff bulk action on its destinations, in chunks."""
    # Imported here: the bulk actions use modules that queue this module's tasks.
    from . import bulk

    bulk.run(job_id)


def wake_workers(deliveries: int | None = None) -> None:
    """Queue wake-up messages, enough for `deliveries` (all of DELIVERY_WAKE_TASKS
    when unknown): one claim round takes DELIVERY_CLAIM_SIZE, so a single event
    needs one worker, not all. None are queued while earlier ones wait to start
    (wakeups.py). A broker that is down only delays delivery, because the sweep
    wakes workers again once it is back."""
    count = settings.DELIVERY_WAKE_TASKS
    if deliveries is not None:
        rounds = -(-deliveries // settings.DELIVERY_CLAIM_SIZE)
        count = max(1, min(count, rounds))
    if not wakeups.claim_turn():
        return
    try:
        for _ in range(count):
            send_due.delay()
    except Exception:
        wakeups.clear()
        logger.exception("Could not queue a wake-up message; the sweep will retry")
