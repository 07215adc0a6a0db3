"""Test events: a small event sent to one destination so staff can check it works."""

from collections.abc import Sequence
from datetime import datetime
from functools import partial

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction
from django.utils import timezone

from destinations.models import Destination

from .ids import new_ulid
from .models import Delivery, Event
from .tasks import wake_workers

TEST_EVENT_TYPE = "PORTAL_TEST"


def send_test_event(
    destination: Destination,
    requested_by: AbstractBaseUser | AnonymousUser | None,
) -> Delivery:
    """Record a test event for `destination` and queue its delivery after commit.

    A disabled destination gets one too, so staff can check it before enabling it.
    Test events go to this destination only, never to the application's others.
    `requested_by` is None when no user asked, as from a command.
    """
    return send_test_events([destination], requested_by)[0]


def send_test_events(
    destinations: Sequence[Destination],
    requested_by: AbstractBaseUser | AnonymousUser | None,
) -> list[Delivery]:
    """Record one test event per destination, in a few statements whatever their
    number, and wake the workers once after commit. Return the deliveries, in the
    order of `destinations`, whose `application` must be loaded already."""
    now = timezone.now()
    username = requested_by.get_username() if requested_by is not None else ""
    events = [_test_event(destination, username, now) for destination in destinations]
    with transaction.atomic():
        Event.objects.bulk_create(events)
        deliveries = Delivery.objects.bulk_create(
            [
                Delivery(
                    event=event,
                    destination=destination,
                    is_test=True,
                    event_time=now,
                    next_attempt_at=now,
                    scheduled_at=now,
                )
                for event, destination in zip(events, destinations, strict=True)
            ]
        )
        # A broker that is down must not turn a committed request into an error
        # page: wake_workers logs the error, and the sweep wakes workers later.
        transaction.on_commit(partial(wake_workers, len(deliveries)))
    return deliveries


def _test_event(destination: Destination, username: str, now: datetime) -> Event:
    return Event(
        id=new_ulid(),
        application=destination.application,
        stage=destination.stage,
        type=TEST_EVENT_TYPE,
        object_key=f"test/{destination.pk}",
        time=now,
        data={
            "message": "A test event from the destinations portal.",
            "destination": destination.name,
            "application": destination.application.slug,
            "stage": destination.stage,
            "requested_by": username,
        },
        is_test=True,
    )
