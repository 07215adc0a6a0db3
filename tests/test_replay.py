"""Staff actions on deliveries: retrying failed ones and replaying a time range."""

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from delivery import engine
from delivery.models import Delivery, DeliveryStatus, Event
from delivery.replay import replay, retry_failed
from destinations.models import Application, Destination, Stage

from .delivery_doubles import (
    BASE_TIME,
    THROTTLED,
    Script,
    add_event,
    install_transport,
    make_application,
    make_destination,
    queue_events,
    run_until_idle,
    status_of,
)

pytestmark = pytest.mark.django_db

KEY_A = "4102/st-1/order/a"
KEY_B = "4102/st-1/order/b"
KEY_C = "4102/st-1/order/c"


@pytest.fixture
def transport(monkeypatch: pytest.MonkeyPatch) -> Script:
    return install_transport(monkeypatch)


@pytest.fixture
def application() -> Application:
    return make_application()


@pytest.fixture
def fifo(application: Application) -> Destination:
    return make_destination(application)


def at(seconds: int) -> Any:
    return BASE_TIME + timedelta(seconds=seconds)


def set_status(delivery: Delivery, status: str, **fields: Any) -> None:
    Delivery.objects.filter(pk=delivery.pk).update(status=status, **fields)


def finish_all(status: str = DeliveryStatus.DELIVERED) -> None:
    Delivery.objects.update(status=status, next_attempt_at=None)


def pause(destination: Destination) -> None:
    Destination.objects.filter(pk=destination.pk).update(paused_at=timezone.now())
    destination.refresh_from_db()


# Retrying failed deliveries.


def test_retry_failed_requeues_only_failed(fifo: Destination) -> None:
    deliveries = queue_events(
        fifo, [("failed", KEY_A, 1), ("delivered", KEY_B, 2), ("pending", KEY_C, 3)]
    )
    long_ago = timezone.now() - timedelta(days=3)
    set_status(
        deliveries["failed"],
        DeliveryStatus.FAILED,
        next_attempt_at=None,
        scheduled_at=long_ago,
    )
    set_status(deliveries["delivered"], DeliveryStatus.DELIVERED)
    before = timezone.now()

    count = retry_failed(Delivery.objects.all())

    retried = deliveries["failed"]
    retried.refresh_from_db()
    assert count == 1
    assert retried.status == DeliveryStatus.PENDING
    assert retried.next_attempt_at is not None
    assert retried.next_attempt_at <= timezone.now()
    assert retried.scheduled_at >= before
    assert status_of(deliveries["delivered"]) == DeliveryStatus.DELIVERED
    assert status_of(deliveries["pending"]) == DeliveryStatus.PENDING


def test_retry_failed_starts_fresh_window(
    application: Application, transport: Script
) -> None:
    destination = make_destination(application, retry_window=1)
    delivery = queue_events(destination, [("a1", KEY_A, 1)])["a1"]
    set_status(
        delivery,
        DeliveryStatus.FAILED,
        scheduled_at=timezone.now() - timedelta(hours=2),
    )
    retry_failed(Delivery.objects.all())
    transport.then("a1", THROTTLED)

    engine.run_once("worker-1")

    assert status_of(delivery) == DeliveryStatus.PENDING


def test_retry_failed_holds_for_paused(fifo: Destination) -> None:
    delivery = queue_events(fifo, [("a1", KEY_A, 1)])["a1"]
    set_status(delivery, DeliveryStatus.FAILED)
    pause(fifo)

    count = retry_failed(Delivery.objects.all())

    assert count == 1
    assert status_of(delivery) == DeliveryStatus.HELD


def test_retry_failed_holds_for_disabled(fifo: Destination) -> None:
    delivery = queue_events(fifo, [("a1", KEY_A, 1)])["a1"]
    set_status(delivery, DeliveryStatus.FAILED)
    Destination.objects.filter(pk=fifo.pk).update(
        enabled=False, disabled_at=timezone.now()
    )

    retry_failed(Delivery.objects.all())

    assert status_of(delivery) == DeliveryStatus.HELD


def test_retried_delivery_is_sent(fifo: Destination, transport: Script) -> None:
    delivery = queue_events(fifo, [("a1", KEY_A, 1)])["a1"]
    set_status(delivery, DeliveryStatus.FAILED)

    retry_failed(Delivery.objects.all())
    run_until_idle()

    assert transport.sent == ["a1"]
    assert status_of(delivery) == DeliveryStatus.DELIVERED


# Replaying a time range.


def test_replay_counts_half_open_range(fifo: Destination) -> None:
    queue_events(
        fifo,
        [
            ("e10", KEY_A, 10),
            ("e20", KEY_A, 20),
            ("e30", KEY_B, 30),
            ("e40", KEY_B, 40),
        ],
    )
    finish_all()

    count = replay(fifo, at(20), at(40))

    statuses = dict(Delivery.objects.values_list("event_id", "status"))
    assert count == 2
    assert statuses == {
        "e10": DeliveryStatus.DELIVERED,
        "e20": DeliveryStatus.PENDING,
        "e30": DeliveryStatus.PENDING,
        "e40": DeliveryStatus.DELIVERED,
    }


def test_replay_requeues_failed_deliveries(fifo: Destination) -> None:
    delivery = queue_events(fifo, [("e10", KEY_A, 10)])["e10"]
    finish_all(DeliveryStatus.FAILED)
    before = timezone.now()

    replay(fifo, at(0), at(60))

    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.PENDING
    assert delivery.scheduled_at >= before


def test_replay_creates_deliveries_for_older_events(
    application: Application, fifo: Destination
) -> None:
    event = add_event(application, "e10", KEY_A, at(10))

    count = replay(fifo, at(0), at(60))

    delivery = Delivery.objects.get(event=event)
    assert count == 1
    assert delivery.destination == fifo
    assert delivery.status == DeliveryStatus.PENDING
    assert delivery.ordering_key == KEY_A
    assert delivery.event_time == event.time


def test_replay_skips_other_stage_and_test_events(
    application: Application, fifo: Destination
) -> None:
    add_event(application, "other-stage", KEY_A, at(10), stage=Stage.TEST)
    test_event = add_event(application, "test-event", KEY_A, at(20))
    Event.objects.filter(pk=test_event.pk).update(is_test=True)

    count = replay(fifo, at(0), at(60))

    assert count == 0
    assert not Delivery.objects.exists()


def test_replay_leaves_in_flight_alone(fifo: Destination) -> None:
    later = timezone.now() + timedelta(minutes=10)
    deliveries = queue_events(
        fifo, [("sending", KEY_A, 10), ("retrying", KEY_B, 20), ("done", KEY_C, 30)]
    )
    engine.claim("worker-1", limit=1)
    set_status(deliveries["retrying"], DeliveryStatus.PENDING, next_attempt_at=later)
    set_status(deliveries["done"], DeliveryStatus.DELIVERED)

    count = replay(fifo, at(0), at(60))

    sending, retrying = deliveries["sending"], deliveries["retrying"]
    sending.refresh_from_db()
    retrying.refresh_from_db()
    assert count == 3
    assert sending.status == DeliveryStatus.SENDING
    assert sending.claimed_by == "worker-1"
    assert retrying.next_attempt_at == later
    assert status_of(deliveries["done"]) == DeliveryStatus.PENDING


def test_replay_sends_ordered_key_in_event_order(
    application: Application, fifo: Destination, transport: Script
) -> None:
    # a3 and a4 were delivered; a1 and a2 were recorded before the destination
    # existed, so their deliveries are created after the others.
    queue_events(fifo, [("a4", KEY_A, 40), ("a3", KEY_A, 30)])
    finish_all()
    add_event(application, "a2", KEY_A, at(20))
    add_event(application, "a1", KEY_A, at(10))

    replay(fifo, at(0), at(60))
    run_until_idle()

    assert transport.sent_with_key(KEY_A) == ["a1", "a2", "a3", "a4"]


def test_replayed_key_waits_for_in_flight_delivery(
    application: Application, fifo: Destination
) -> None:
    queue_events(fifo, [("a5", KEY_A, 50)])
    engine.claim("worker-1", limit=10)
    add_event(application, "a1", KEY_A, at(10))

    replay(fifo, at(0), at(20))

    assert engine.claim("worker-2", limit=10) == []


def test_replay_holds_for_paused(application: Application, fifo: Destination) -> None:
    queue_events(fifo, [("e10", KEY_A, 10)])
    finish_all()
    add_event(application, "e20", KEY_A, at(20))
    pause(fifo)

    replay(fifo, at(0), at(60))

    statuses = set(Delivery.objects.values_list("status", flat=True))
    assert statuses == {DeliveryStatus.HELD}
