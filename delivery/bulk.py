"""Bulk actions on many destinations: test events and retries of failed deliveries.

The admin request only records a BulkJob with the selected destinations' ids and
queues one task. The worker goes through the ids in chunks, one transaction each,
and counts its progress on the job. A test send's outcome is its delivery's status,
which the job's page reads, so no task waits for a delivery.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction
from django.db.models import Count, OuterRef, Q, QuerySet, Subquery, Sum
from django.utils import timezone

from destinations.models import Destination

from .models import (
    Attempt,
    BulkJob,
    BulkJobItem,
    BulkJobKind,
    Delivery,
    DeliveryStatus,
    Outcome,
)
from .replay import retry_failed
from .testevents import send_test_events

logger = logging.getLogger(__name__)

CHUNK_SIZE = 100


def start(
    kind: BulkJobKind,
    destination_ids: Sequence[int],
    user: AbstractBaseUser | AnonymousUser | None,
) -> BulkJob:
    """Record a job for `destination_ids` and queue its task after commit."""
    job = BulkJob.objects.create(
        kind=kind,
        created_by_id=user.pk if user is not None and user.is_authenticated else None,
        destination_ids=list(destination_ids),
        total=len(destination_ids),
    )
    transaction.on_commit(partial(_queue, job.pk))
    logger.info("Bulk job %s: %s on %d destinations", job.pk, kind, job.total)
    return job


def _queue(job_id: int) -> None:
    from .tasks import run_bulk_job

    try:
        run_bulk_job.delay(job_id)
    except Exception:
        # The sweep queues unfinished jobs again once the broker is back.
        logger.exception("Could not queue bulk job %s", job_id)


def requeue_unfinished(older_than: timedelta = timedelta(minutes=1)) -> int:
    """Queue unfinished jobs again, and return how many.

    A job whose task message was lost (broker down, worker killed) would otherwise
    never finish. A job that is still running gets a second task, which finds the
    row locked and returns at once.
    """
    cutoff = timezone.now() - older_than
    unfinished = BulkJob.objects.filter(finished_at__isnull=True, created_at__lt=cutoff)
    job_ids = list(unfinished.values_list("pk", flat=True)[:100])
    for job_id in job_ids:
        _queue(job_id)
    return len(job_ids)


def run(job_id: int, chunk_size: int = CHUNK_SIZE) -> None:
    """Work through the job's destinations, one chunk per transaction.

    The job row is locked while a chunk is done, and `done` moves in the same
    transaction, so a task that runs twice resumes where the other stopped and
    never does a destination twice.
    """
    while _run_chunk(job_id, chunk_size):
        pass


def _run_chunk(job_id: int, chunk_size: int) -> bool:
    """Do the next chunk; return whether more may be left."""
    with transaction.atomic():
        job = (
            BulkJob.objects.select_for_update(skip_locked=True)
            .filter(pk=job_id)
            .first()
        )
        if job is None:
            # Deleted, or another task has locked the row and is doing this job now.
            logger.info("Bulk job %s is gone or running elsewhere", job_id)
            return False
        if job.finished_at is not None:
            return False

        ids = [int(pk) for pk in job.destination_ids[job.done : job.done + chunk_size]]
        succeeded, failed = ACTIONS[BulkJobKind(job.kind)](job, ids)
        job.done += len(ids)
        job.succeeded += succeeded
        job.failed += failed
        if job.done >= job.total:
            job.finished_at = timezone.now()
        job.save(update_fields=["done", "succeeded", "failed", "finished_at"])

    logger.info("Bulk job %s: %d of %d done", job.pk, job.done, job.total)
    return job.finished_at is None


def _gone(job: BulkJob, destination_id: int) -> BulkJobItem:
    return BulkJobItem(
        job=job,
        destination_name=f"Destination {destination_id}",
        error="The destination was deleted after it was selected.",
    )


def _send_tests(job: BulkJob, ids: list[int]) -> tuple[int, int]:
    found = Destination.objects.select_related("application").in_bulk(ids)
    destinations = [found[pk] for pk in ids if pk in found]
    deliveries = send_test_events(destinations, requested_by=job.created_by)
    items = [
        BulkJobItem(
            job=job,
            destination=destination,
            destination_name=destination.name,
            delivery=delivery,
        )
        for destination, delivery in zip(destinations, deliveries, strict=True)
    ]
    items += [_gone(job, pk) for pk in ids if pk not in found]
    BulkJobItem.objects.bulk_create(items)
    return len(destinations), len(ids) - len(destinations)


def _retry_failed(job: BulkJob, ids: list[int]) -> tuple[int, int]:
    found = Destination.objects.only("name").in_bulk(ids)
    deliveries = Delivery.objects.filter(destination_id__in=list(found))
    failed = deliveries.filter(status=DeliveryStatus.FAILED)
    counts = dict(
        failed.order_by()
        .values_list("destination_id")
        .annotate(Count("pk"))
        .values_list("destination_id", "pk__count")
    )
    retry_failed(deliveries)
    items = [
        BulkJobItem(
            job=job,
            destination=destination,
            destination_name=destination.name,
            count=counts.get(pk, 0),
        )
        for pk, destination in found.items()
    ]
    items += [_gone(job, pk) for pk in ids if pk not in found]
    BulkJobItem.objects.bulk_create(items)
    return len(found), len(ids) - len(found)


ACTIONS: dict[BulkJobKind, Callable[[BulkJob, list[int]], tuple[int, int]]] = {
    BulkJobKind.TEST_EVENT: _send_tests,
    BulkJobKind.RETRY_FAILED: _retry_failed,
}


# The job's page.


@dataclass
class Progress:
    """The figures of a job's page: the worker's counts and, for test events, the
    test deliveries' statuses."""

    job: BulkJob
    delivered: int = 0
    failed: int = 0
    waiting: int = 0
    requeued: int = 0

    @property
    def running(self) -> bool:
        return self.job.finished_at is None or self.waiting > 0

    @property
    def finished_at(self) -> datetime | None:
        return None if self.running else self.job.finished_at


def progress(job: BulkJob) -> Progress:
    """Read the job's progress in one query."""
    result = Progress(job)
    if job.kind == BulkJobKind.RETRY_FAILED:
        result.requeued = job.items.aggregate(total=Sum("count"))["total"] or 0
        return result
    statuses = job.items.filter(delivery__isnull=False).aggregate(
        delivered=Count("pk", filter=Q(delivery__status=DeliveryStatus.DELIVERED)),
        failed=Count("pk", filter=Q(delivery__status=DeliveryStatus.FAILED)),
        total=Count("pk"),
    )
    result.delivered = statuses["delivered"]
    result.failed = statuses["failed"]
    result.waiting = statuses["total"] - result.delivered - result.failed
    return result


def results(job: BulkJob) -> QuerySet[BulkJobItem]:
    """Return the job's items by destination name, annotated for test events
    with the last attempt of each delivery."""
    attempts = Attempt.objects.filter(delivery=OuterRef("delivery")).order_by(
        "-started_at"
    )
    return (
        job.items.select_related("delivery")
        .annotate(
            outcome=Subquery(attempts.values("outcome")[:1]),
            attempt_at=Subquery(attempts.values("started_at")[:1]),
            error_kind=Subquery(attempts.values("error_kind")[:1]),
            message=Subquery(attempts.values("message")[:1]),
            remote_message_id=Subquery(attempts.values("remote_message_id")[:1]),
        )
        .order_by("destination_name", "pk")
    )


@dataclass
class Row:
    """One destination's line in a finished job's results."""

    item: BulkJobItem
    status: str
    text: str


def describe(job: BulkJob, item: Any) -> Row:
    """Say what the job did for one item of `results()`."""
    if item.error:
        return Row(item, "error", item.error)
    if job.kind == BulkJobKind.RETRY_FAILED:
        if not item.count:
            return Row(item, "none", "No failed deliveries.")
        noun = "delivery" if item.count == 1 else "deliveries"
        return Row(item, "queued", f"Queued {item.count} failed {noun} again.")

    delivery = item.delivery
    if delivery is None:
        return Row(item, "error", "The test delivery was deleted.")
    if item.outcome == Outcome.SUCCESS:
        when = f"{item.attempt_at:%Y-%m-%d %H:%M:%S}"
        return Row(
            item,
            "delivered",
            f"Delivered at {when} UTC, message ID {item.remote_message_id}.",
        )
    if delivery.status == DeliveryStatus.FAILED and item.outcome:
        return Row(
            item,
            "failed",
            f"{Outcome(item.outcome).label} ({item.error_kind}): {item.message}",
        )
    return Row(item, "waiting", f"{delivery.get_status_display()}.")
