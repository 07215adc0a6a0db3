"""The delivery engine: claim a delivery, send it through its transport, record the
attempt.

The database row is the only record that counts. A broker message that arrives twice
finds the delivery already claimed and does nothing.
"""

import logging
import time
from datetime import datetime

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from .models import Attempt, Delivery, DeliveryStatus, Outcome
from .transports import Blame, Failure, OutgoingMessage, Result, Sent, transport_for

logger = logging.getLogger(__name__)


def deliver(delivery_id: int) -> None:
    """Send delivery `delivery_id` once if it is pending, and record the attempt."""
    claimed = Delivery.objects.filter(
        pk=delivery_id, status=DeliveryStatus.PENDING
    ).update(status=DeliveryStatus.SENDING, updated_at=timezone.now())
    if not claimed:
        logger.info(
            "Delivery %s is not pending (another worker has it, or it is done)",
            delivery_id,
        )
        return

    delivery = Delivery.objects.select_related(
        "event", "destination", "destination__application"
    ).get(pk=delivery_id)
    logger.info(
        "Sending event %s to destination %s (delivery %s)",
        delivery.event_id,
        delivery.destination_id,
        delivery.pk,
    )

    started_at = timezone.now()
    start = time.monotonic()
    result = _send(delivery)
    duration_ms = round((time.monotonic() - start) * 1000)
    _record(delivery, result, started_at, duration_ms)


def _send(delivery: Delivery) -> Result:
    """Send `delivery` through its destination's transport and return the result.

    An Exception raised by the transport becomes a transient internal error.
    """
    destination = delivery.destination
    event = delivery.event
    try:
        transport = transport_for(destination)
        if transport is None:
            return Failure(
                kind="not_available",
                message=(
                    f"Sending to {destination.get_kind_display()} is not available yet."
                ),
                permanent=True,
                blame=Blame.DESTINATION,
            )

        message = OutgoingMessage(
            event_id=event.id,
            event_type=event.type,
            object_key=event.object_key,
            body=event.body(),
        )
        results = transport.send([message])
        if len(results) != 1:
            raise RuntimeError(f"the transport returned {len(results)} results for 1")
        return results[0]
    except Exception as error:
        # Transports report expected failures as results, so this is a bug or an
        # outage the transport did not foresee. The exception's text is logged for
        # the operators; the attempt shows only its class.
        logger.exception(
            "Sending event %s to destination %s (delivery %s) raised %s",
            event.id,
            destination.pk,
            delivery.pk,
            type(error).__name__,
        )
        return Failure(
            kind="internal_error",
            message=(
                f"The platform failed while sending ({type(error).__name__}). Its "
                "operators have the details in the worker's log."
            ),
            permanent=False,
        )


def _record(
    delivery: Delivery, result: Result, started_at: datetime, duration_ms: int
) -> None:
    """Store the attempt and the delivery's new status together."""
    if isinstance(result, Sent):
        outcome = Outcome.SUCCESS
        status = DeliveryStatus.DELIVERED
        attempt_fields = {"remote_message_id": result.remote_message_id}
    else:
        outcome = (
            Outcome.PERMANENT_ERROR if result.permanent else Outcome.TRANSIENT_ERROR
        )
        # NOTE: every failure ends the delivery for now, which is right for test
        # events (sent once). The retry engine belongs here: a transient failure of
        # a real event should set next_attempt_at and return the delivery to
        # pending, and a failure the destination is blamed for should pause it.
        status = DeliveryStatus.FAILED
        attempt_fields = {"error_kind": result.kind, "message": result.message}

    with transaction.atomic():
        Attempt.objects.create(
            delivery=delivery,
            started_at=started_at,
            duration_ms=duration_ms,
            outcome=outcome,
            **attempt_fields,
        )
        Delivery.objects.filter(pk=delivery.pk).update(
            status=status,
            attempt_count=F("attempt_count") + 1,
            next_attempt_at=None,
            updated_at=timezone.now(),
        )

    if isinstance(result, Sent):
        logger.info(
            "Delivered event %s to destination %s (delivery %s) in %d ms as message %s",
            delivery.event_id,
            delivery.destination_id,
            delivery.pk,
            duration_ms,
            result.remote_message_id,
        )
    else:
        logger.info(
            "Failed to deliver event %s to destination %s (delivery %s) in %d ms: "
            "%s %s",
            delivery.event_id,
            delivery.destination_id,
            delivery.pk,
            duration_ms,
            outcome,
            result.kind,
        )
