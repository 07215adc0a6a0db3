"""The delivery engine: send claimed deliveries (see claiming.py) in batches per
destination, record every attempt, and decide what happens next.

The database is the only record that counts. A broker message only wakes a worker.
One that is lost or arrives twice changes nothing but latency, because deliveries are
claimed from the table with a lease and the periodic sweep wakes workers again.
"""

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from itertools import groupby

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from destinations.models import Destination

from . import health
from .claiming import claim as claim  # Callers claim and send through this module.
from .claiming import claim_round, has_claimable, pk_in
from .models import Attempt, Delivery, DeliveryStatus, Outcome
from .retry import retry_deadline, retry_delay
from .rows import Row, insert_rows
from .transports import Blame, Failure, OutgoingMessage, Result, Sent, transport_for

logger = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def deliver(delivery_id: int, worker: str | None = None) -> bool:
    """Claim and send one delivery now if it is pending; return whether it was.

    This skips the ordering check and the destination's pause: it is for sending
    one chosen delivery, as a test does, not for the normal flow.
    """
    worker = worker or worker_name()
    now = timezone.now()
    claimed = Delivery.objects.filter(
        pk=delivery_id, status=DeliveryStatus.PENDING
    ).update(
        status=DeliveryStatus.SENDING,
        lease_expires_at=now + timedelta(seconds=settings.DELIVERY_LEASE_SECONDS),
        claimed_by=worker,
        updated_at=now,
    )
    if not claimed:
        logger.info("Delivery %s is not pending; nothing to send", delivery_id)
        return False
    delivery = Delivery.objects.select_related(
        "event", "destination", "destination__application"
    ).get(pk=delivery_id)
    send_batch(worker, [delivery])
    return True


def run_once(worker: str, limit: int | None = None) -> int:
    """Claim one batch of due deliveries, send it, and return how many were
    claimed."""
    claimed = claim_round(worker, limit or settings.DELIVERY_CLAIM_SIZE)
    send_claimed(worker, claimed.deliveries, claimed.lease_until)
    return len(claimed.deliveries)


def send_claimed(
    worker: str, deliveries: list[Delivery], lease_until: datetime | None = None
) -> None:
    """Send claimed deliveries, one transport call per destination.

    A call starts only in the first half of the lease that ends at `lease_until`,
    so that it can end before another worker may reclaim its deliveries and send
    them again. The deliveries of the calls that cannot start go back to pending.
    """
    # A stable sort keeps the claim's order within each destination, which is
    # each ordering key's order as the database compares event ids.
    deliveries.sort(key=lambda delivery: delivery.destination_id)
    groups = [
        list(group)
        for _, group in groupby(
            deliveries, key=lambda delivery: delivery.destination_id
        )
    ]
    half_lease = timedelta(seconds=settings.DELIVERY_LEASE_SECONDS / 2)
    for number, group in enumerate(groups):
        if lease_until is not None and timezone.now() >= lease_until - half_lease:
            _release(
                worker, [delivery for rest in groups[number:] for delivery in rest]
            )
            return
        send_batch(worker, group)


def _release(worker: str, deliveries: list[Delivery]) -> None:
    """Set claimed deliveries that were not sent back to pending, due as before."""
    released = _claimed_by(worker, [delivery.pk for delivery in deliveries]).update(
        status=DeliveryStatus.PENDING,
        lease_expires_at=None,
        claimed_by="",
        updated_at=timezone.now(),
    )
    logger.warning(
        "Released %d claimed deliveries to destinations %s unsent, because the "
        "claim's earlier calls took half of its %d-second lease. A later claim "
        "sends them",
        released,
        ", ".join(str(pk) for pk in sorted({d.destination_id for d in deliveries})),
        settings.DELIVERY_LEASE_SECONDS,
    )


def drain(
    worker: str,
    budget_seconds: float,
    on_backlog: Callable[[], object] | None = None,
    share: int = 1,
) -> bool:
    """Send due deliveries until none is left or the budget is spent.

    Each round claims `share` of the due keys (see claim_round). The first round
    that leaves due deliveries behind calls `on_backlog` once, before sending, so
    the caller can wake another worker to send them meanwhile.

    Return True when work may be left, so the caller can queue another round and
    let other tasks of this worker run in between.
    """
    deadline = time.monotonic() + budget_seconds
    while time.monotonic() < deadline:
        claimed = claim_round(worker, settings.DELIVERY_CLAIM_SIZE, share)
        if not claimed.deliveries:
            return False
        if on_backlog is not None and claimed.left_work:
            on_backlog()
            on_backlog = None
        send_claimed(worker, claimed.deliveries, claimed.lease_until)
    return True


def send_batch(worker: str, deliveries: Sequence[Delivery]) -> None:
    """Send deliveries of one destination in one transport call, and record them."""
    destination = deliveries[0].destination
    messages = [
        OutgoingMessage(
            event_id=delivery.event.id,
            event_type=delivery.event.type,
            object_key=delivery.ordering_key or delivery.event.object_key,
            body=delivery.event.body(),
        )
        for delivery in deliveries
    ]
    logger.info(
        "Sending %d events to destination %s: %s",
        len(messages),
        destination.pk,
        _ids(messages),
    )
    started_at = timezone.now()
    start = time.monotonic()
    results = _send(destination, messages)
    duration_ms = round((time.monotonic() - start) * 1000)
    record(worker, destination, deliveries, results, started_at, duration_ms)


def _send(destination: Destination, messages: list[OutgoingMessage]) -> list[Result]:
    """Send through the destination's transport; an exception becomes a transient
    failure of every message, because transports report expected errors as results.
    """
    try:
        transport = transport_for(destination)
        if transport is None:
            failure = Failure(
                kind="not_available",
                message=(
                    f"Sending to {destination.get_kind_display()} is not available."
                ),
                permanent=True,
                blame=Blame.DESTINATION,
            )
            return [failure] * len(messages)

        results = transport.send(messages)
        if len(results) != len(messages):
            raise RuntimeError(
                f"the transport returned {len(results)} results for {len(messages)}"
            )
        return [_without_nul(result) for result in results]
    except Exception as error:
        logger.exception(
            "Sending events %s to destination %s raised %s",
            _ids(messages),
            destination.pk,
            type(error).__name__,
        )
        failure = Failure(
            kind="internal_error",
            message=(
                f"The platform failed while sending ({type(error).__name__}). Its "
                "operators have the details in the worker's log."
            ),
            permanent=False,
        )
        return [failure] * len(messages)


def _without_nul(result: Result) -> Result:
    """Return `result` with each NUL in its text replaced by U+FFFD.

    The text can come from the remote service: its error message, its message id.
    PostgreSQL rejects a NUL in text, so one would fail the whole record, and the
    call's deliveries would stay leased until the lease expired, to be sent again.
    """
    if isinstance(result, Sent):
        if "\x00" not in result.remote_message_id:
            return result
        return Sent(result.remote_message_id.replace("\x00", "\ufffd"))
    if "\x00" not in result.kind + result.message:
        return result
    return replace(
        result,
        kind=result.kind.replace("\x00", "\ufffd"),
        message=result.message.replace("\x00", "\ufffd"),
    )


def _ids(messages: Sequence[OutgoingMessage], shown: int = 10) -> str:
    ids = ", ".join(message.event_id for message in messages[:shown])
    hidden = len(messages) - shown
    return f"{ids} and {hidden} more" if hidden > 0 else ids


def record(
    worker: str,
    destination: Destination,
    deliveries: Sequence[Delivery],
    results: Sequence[Result],
    started_at: datetime,
    duration_ms: int,
) -> None:
    """Store one attempt per delivery, move each delivery on, and update the
    destination's health, in one transaction."""
    now = timezone.now()
    attempts = []
    delivered: list[int] = []
    waiting: list[int] = []
    outcome_of_destination = health.BatchOutcome()
    held_back = _held_back(destination, deliveries, results)

    with transaction.atomic():
        for index, (delivery, result) in enumerate(
            zip(deliveries, results, strict=True)
        ):
            if index in held_back:
                waiting.append(delivery.pk)
                continue
            attempts.append(_attempt(delivery, result, started_at, duration_ms))
            if not delivery.is_test:
                outcome_of_destination.add(result)
            if isinstance(result, Sent):
                # Successes share one UPDATE: it is most of a busy batch.
                delivered.append(delivery.pk)
                continue
            changes = _next_state(delivery, result, now)
            _claimed_by(worker, [delivery.pk]).update(
                **changes, lease_expires_at=None, claimed_by="", updated_at=now
            )
            _log(delivery, result, duration_ms)

        _mark_delivered(worker, delivered, now)
        # Not sent, so no attempt: each waits behind its key's failed delivery,
        # whose retry schedule decides when the key moves again.
        _claimed_by(worker, waiting).update(
            status=DeliveryStatus.PENDING,
            next_attempt_at=now,
            lease_expires_at=None,
            claimed_by="",
            updated_at=now,
        )
        insert_rows(Attempt, attempts)
        if outcome_of_destination:
            health.apply(destination, outcome_of_destination, now)

    if delivered:
        logger.info(
            "Delivered %d events to destination %s in %d ms",
            len(delivered),
            destination.pk,
            duration_ms,
        )


# The UPDATE of _mark_delivered, written out for PostgreSQL: Django took longer to
# build and compile it than PostgreSQL took to run it.
_DELIVERED_SQL = """
    UPDATE delivery_delivery
    SET status = 'delivered', next_attempt_at = NULL,
        attempt_count = attempt_count + 1, lease_expires_at = NULL, claimed_by = '',
        updated_at = %(now)s
    WHERE id = ANY(%(ids)s) AND status = 'sending' AND claimed_by = %(worker)s
"""


def _mark_delivered(worker: str, delivery_ids: list[int], now: datetime) -> None:
    """Mark the deliveries still claimed by `worker` among `delivery_ids` as
    delivered (see _claimed_by)."""
    if not delivery_ids:
        return
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                _DELIVERED_SQL, {"ids": delivery_ids, "now": now, "worker": worker}
            )
        return
    _claimed_by(worker, delivery_ids).update(
        status=DeliveryStatus.DELIVERED,
        next_attempt_at=None,
        attempt_count=F("attempt_count") + 1,
        lease_expires_at=None,
        claimed_by="",
        updated_at=now,
    )


def _held_back(
    destination: Destination,
    deliveries: Sequence[Delivery],
    results: Sequence[Result],
) -> set[int]:
    """Return the positions in a call of the deliveries that were not sent because
    an earlier delivery of their ordering key failed in the same call.

    Every transport stops sending a key at its first failure that is not the
    message's own (too large). It reports the messages after it with that failure
    or a paused-key error, but they were never attempted.
    """
    if not destination.is_ordered:
        return set()
    stopped: set[str] = set()
    held_back = set()
    for index, (delivery, result) in enumerate(zip(deliveries, results, strict=True)):
        key = delivery.ordering_key
        if not key:
            continue
        if key not in stopped:
            if isinstance(result, Failure) and result.blame != Blame.MESSAGE:
                stopped.add(key)
        elif isinstance(result, Failure):
            held_back.add(index)
        else:
            logger.error(
                "Event %s went out to destination %s after an earlier event of its "
                "ordering key %r failed in the same call, so it arrived out of order",
                delivery.event_id,
                destination.pk,
                key,
            )
    return held_back


def _claimed_by(worker: str, delivery_ids: list[int]) -> QuerySet[Delivery]:
    """Return the deliveries still claimed by `worker`. The lease guard: if its
    lease expired and another worker took one over, that outcome is the other
    worker's to record."""
    return Delivery.objects.filter(
        pk_in(delivery_ids), status=DeliveryStatus.SENDING, claimed_by=worker
    )


def _attempt(
    delivery: Delivery, result: Result, started_at: datetime, duration_ms: int
) -> Row:
    """Return the attempt that sent `delivery` with `result`, as a row."""
    row: Row = {
        "delivery_id": delivery.pk,
        "destination_id": delivery.destination_id,
        "is_test": delivery.is_test,
        "started_at": started_at,
        "duration_ms": duration_ms,
        "outcome": Outcome.SUCCESS,
        "error_kind": "",
        "message": "",
        "remote_message_id": "",
    }
    if isinstance(result, Sent):
        row["remote_message_id"] = result.remote_message_id
    else:
        row["outcome"] = (
            Outcome.PERMANENT_ERROR if result.permanent else Outcome.TRANSIENT_ERROR
        )
        row["error_kind"] = result.kind
        row["message"] = result.message
    return row


def _next_state(delivery: Delivery, result: Result, now: datetime) -> dict[str, object]:
    """Return the delivery's new field values after `result`."""
    attempt_count = delivery.attempt_count + 1
    delivered = {"status": DeliveryStatus.DELIVERED, "next_attempt_at": None}
    failed = {"status": DeliveryStatus.FAILED, "next_attempt_at": None}

    if isinstance(result, Sent):
        return {**delivered, "attempt_count": attempt_count}
    # A test event is sent once: staff want its result now, not a retry later.
    if delivery.is_test:
        return {**failed, "attempt_count": attempt_count}
    if result.permanent and result.blame != Blame.DESTINATION:
        return {**failed, "attempt_count": attempt_count}

    destination = delivery.destination
    if result.permanent:
        # The destination is paused; this delivery stays first in line and goes out
        # as soon as the destination is enabled again.
        return {
            "status": DeliveryStatus.PENDING,
            "next_attempt_at": now,
            "attempt_count": attempt_count,
        }
    if now >= retry_deadline(destination, delivery.scheduled_at):
        return {**failed, "attempt_count": attempt_count}
    return {
        "status": DeliveryStatus.PENDING,
        "next_attempt_at": now + retry_delay(destination, attempt_count),
        "attempt_count": attempt_count,
    }


def _log(delivery: Delivery, result: Failure, duration_ms: int) -> None:
    logger.warning(
        "Delivery %s of event %s to destination %s failed (%s, %s) in %d ms: %s",
        delivery.pk,
        delivery.event_id,
        delivery.destination_id,
        "permanent" if result.permanent else "transient",
        result.kind,
        duration_ms,
        result.message,
    )


def release_expired_leases() -> int:
    """Return deliveries whose worker vanished to pending, and count them.

    The worker may have sent the message before it died, so the next attempt can
    be a duplicate. A duplicate carries the same event id (and SQS deduplication id).
    """
    now = timezone.now()
    released = 0
    with transaction.atomic():
        expired = Delivery.objects.filter(
            status=DeliveryStatus.SENDING, lease_expires_at__lt=now
        ).select_for_update(skip_locked=True)
        for delivery in expired:
            Attempt.objects.create(
                delivery=delivery,
                started_at=delivery.updated_at,
                duration_ms=round((now - delivery.updated_at).total_seconds() * 1000),
                outcome=Outcome.TRANSIENT_ERROR,
                error_kind="lease_expired",
                message=(
                    f"Worker {delivery.claimed_by} stopped before recording the "
                    "result; the event is sent again and may arrive twice, with the "
                    "same event id."
                ),
            )
            released += 1
        expired_ids = [delivery.pk for delivery in expired]
        Delivery.objects.filter(pk__in=expired_ids).update(
            status=DeliveryStatus.PENDING,
            next_attempt_at=now,
            lease_expires_at=None,
            claimed_by="",
            updated_at=now,
        )
    if released:
        logger.warning("Released %d deliveries whose lease expired", released)
    return released


def has_due_work() -> bool:
    """Return whether a worker could claim a delivery now.

    A due delivery of a paused destination, or one waiting behind an earlier
    delivery of its ordering key, does not count. Otherwise every sweep would wake
    workers that claim nothing, for as long as it waits.
    """
    return has_claimable(timezone.now())
