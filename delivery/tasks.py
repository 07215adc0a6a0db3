"""Celery tasks: thin wrappers that carry no data and leave the work to the engine.

A task message only wakes a worker. Losing one delays delivery until the next sweep;
running one twice is harmless, because deliveries are claimed from the database.
"""

import logging
from functools import partial

from celery import shared_task
from django.conf import settings

from . import engine, health

logger = logging.getLogger(__name__)


@shared_task(acks_late=True, ignore_result=True)
def send_due() -> None:
    """Send due deliveries until none is left or this round's budget is spent."""
    # A full claim means a backlog: another worker can take the keys this one left.
    if engine.drain(
        engine.worker_name(),
        settings.DELIVERY_DRAIN_SECONDS,
        on_backlog=partial(wake_workers, 1),
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
    needs one worker, not all. A broker that is down only delays delivery, because
    the sweep wakes workers again once it is back."""
    count = settings.DELIVERY_WAKE_TASKS
    if deliveries is not None:
        rounds = -(-deliveries // settings.DELIVERY_CLAIM_SIZE)
        count = max(1, min(count, rounds))
    try:
        for _ in range(count):
            send_due.delay()
    except Exception:
        logger.exception("Could not queue a wake-up message; the sweep will retry")
