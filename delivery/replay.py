"""Staff actions on deliveries: retry failed ones and replay a time range."""

import logging
from datetime import datetime

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from destinations.models import Destination

from .models import UNFINISHED, Delivery, DeliveryStatus, Event

logger = logging.getLogger(__name__)


def retry_failed(deliveries: QuerySet[Delivery]) -> int:
    """Queue failed deliveries again with a fresh retry window; return how many.

    A delivery to a destination that is paused or disabled by the engine is held
    instead, and goes out when the destination is enabled again.
    """
    from .tasks import wake_workers

    now = timezone.now()
    failed = deliveries.filter(status=DeliveryStatus.FAILED)
    with transaction.atomic():
        held = failed.filter(destination__paused_at__isnull=False) | failed.filter(
            destination__disabled_at__isnull=False
        )
        held_count = Delivery.objects.filter(pk__in=held.values("pk")).update(
            status=DeliveryStatus.HELD, scheduled_at=now, updated_at=now
        )
        pending_count = Delivery.objects.filter(pk__in=failed.values("pk")).update(
            status=DeliveryStatus.PENDING,
            next_attempt_at=now,
            scheduled_at=now,
            updated_at=now,
        )
        transaction.on_commit(wake_workers)
    logger.info("Retrying %d failed deliveries", held_count + pending_count)
    return held_count + pending_count


def events_in_range(
    destination: Destination, start: datetime, end: datetime
) -> QuerySet[Event]:
    """Return the events of the destination's application and stage with
    start <= time < end, test events excluded."""
    return Event.objects.filter(
        application=destination.application,
        stage=destination.stage,
        is_test=False,
        time__gte=start,
        time__lt=end,
    )


def replay(destination: Destination, start: datetime, end: datetime) -> int:
    """Send every event of [start, end) to `destination` again; return how many.

    Deliveries that are still on their way are left alone. The others go back to
    pending (or held, if the engine paused or disabled the destination). Events
    recorded before the destination existed get a new delivery. On an ordered
    destination, each key's events go out in event order, old and new alike.
    """
    from .tasks import wake_workers

    now = timezone.now()
    status = (
        DeliveryStatus.HELD if destination.holds_deliveries else DeliveryStatus.PENDING
    )
    events = events_in_range(destination, start, end)
    with transaction.atomic():
        existing = Delivery.objects.filter(destination=destination, event__in=events)
        # Counted before the update, which makes the requeued ones unfinished too.
        unfinished = existing.filter(status__in=UNFINISHED).count()
        requeued = existing.exclude(status__in=UNFINISHED).update(
            status=status, next_attempt_at=now, scheduled_at=now, updated_at=now
        )
        missing = events.exclude(deliveries__destination=destination).order_by(
            "time", "id"
        )
        created = Delivery.objects.bulk_create(
            [
                Delivery(
                    event=event,
                    destination=destination,
                    status=status,
                    ordering_key=event.object_key if destination.is_ordered else "",
                    event_time=event.time,
                    next_attempt_at=now,
                    scheduled_at=now,
                )
                for event in missing.iterator()
            ]
        )
        transaction.on_commit(wake_workers)
    total = requeued + len(created) + unfinished
    logger.info(
        "Replaying %d events to destination %s (%d still on their way)",
        total,
        destination.pk,
        unfinished,
    )
    return total
