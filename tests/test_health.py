"""A destination's health: pausing on the destination's own failures, automatic
disabling, enabling again, held deliveries, the e-mails to the application's
contacts, and test events, which never change any of it."""

import json
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.core import mail
from django.db import connection, transaction
from django.utils import timezone

from delivery import engine, health
from delivery.models import Delivery, DeliveryStatus, Outcome
from delivery.publishing import PublishResult, publish
from delivery.testevents import send_test_event
from delivery.transports import Failure
from destinations.models import Application, Destination, State

from .delivery_doubles import (
    ACCESS_DENIED,
    BASE_TIME,
    CONTACTS,
    THROTTLED,
    Script,
    install_transport,
    make_application,
    make_destination,
    make_due,
    queue_events,
    run_until_idle,
    status_of,
)

pytestmark = pytest.mark.django_db

KEY_A = "4102/st-1/order/a"
KEY_B = "4102/st-1/order/b"
KEY_C = "4102/st-1/order/c"
TIMED_OUT = Failure(
    kind="timeout", message="The queue did not answer in 5 s.", permanent=False
)


@pytest.fixture
def transport(monkeypatch: pytest.MonkeyPatch) -> Script:
    return install_transport(monkeypatch)


@pytest.fixture
def application() -> Application:
    return make_application()


@pytest.fixture
def fifo(application: Application) -> Destination:
    return make_destination(application)


@pytest.fixture
def on_commit(django_capture_on_commit_callbacks: Any) -> Any:
    """Run the callbacks registered with transaction.on_commit, such as e-mails, when
    the block ends, as a commit would."""
    return lambda: django_capture_on_commit_callbacks(execute=True)


def order_event(order: str, event_id: str, seconds: int) -> str:
    return json.dumps(
        {
            "id": event_id,
            "time": (BASE_TIME + timedelta(seconds=seconds)).isoformat(),
            "type": "ACCEPT",
            "data": {
                "channel_id": "4102",
                "channel_store_id": "st-1",
                "channel_order_id": order,
            },
        }
    )


def publish_order(
    application: Application, order: str, event_id: str, seconds: int
) -> PublishResult:
    return publish(application, "PROD", order_event(order, event_id, seconds))


def pause(destination: Destination) -> None:
    Destination.objects.filter(pk=destination.pk).update(
        paused_at=timezone.now(), pause_reason=ACCESS_DENIED.message
    )


def fail_for(destination: Destination, hours: float, failures: int) -> None:
    Destination.objects.filter(pk=destination.pk).update(
        failing_since=timezone.now() - timedelta(hours=hours),
        consecutive_failures=failures,
        last_error=f"{THROTTLED.kind}: {THROTTLED.message}",
    )


# Pausing.


def test_destination_failure_pauses_destination(
    fifo: Destination, transport: Script
) -> None:
    delivery = queue_events(fifo, [("a1", KEY_A, 1)])["a1"]
    transport.then("a1", ACCESS_DENIED)

    run_until_idle()

    fifo.refresh_from_db()
    assert fifo.paused_at is not None
    assert fifo.pause_reason == ACCESS_DENIED.message
    assert fifo.state == State.PAUSED
    assert status_of(delivery) == DeliveryStatus.PENDING
    assert delivery.attempts.get().outcome == Outcome.PERMANENT_ERROR


def test_paused_destination_claims_nothing_more(
    fifo: Destination, transport: Script
) -> None:
    queue_events(fifo, [("a1", KEY_A, 1), ("b1", KEY_B, 2)])
    transport.then("a1", ACCESS_DENIED)
    run_until_idle()
    later = queue_events(fifo, [("b2", KEY_B, 3), ("c1", KEY_C, 4)])

    run_until_idle()

    assert transport.sent == ["a1", "b1"]
    assert engine.claim("worker-1", limit=10) == []
    assert status_of(later["b2"]) == DeliveryStatus.PENDING
    assert status_of(later["c1"]) == DeliveryStatus.PENDING


def test_pause_leaves_other_destinations_sending(
    fifo: Destination, transport: Script
) -> None:
    other = make_destination(make_application("market"), name="Market FIFO")
    queue_events(fifo, [("a1", KEY_A, 1)])
    transport.then("a1", ACCESS_DENIED)
    run_until_idle()

    queue_events(other, [("m1", KEY_A, 2)])
    run_until_idle()

    assert transport.sent == ["a1", "m1"]


def test_pause_mails_contacts_once(
    fifo: Destination, transport: Script, on_commit: Any
) -> None:
    queue_events(fifo, [("a1", KEY_A, 1), ("b1", KEY_B, 2)])
    transport.then("a1", ACCESS_DENIED)
    transport.then("b1", ACCESS_DENIED)

    with on_commit():
        run_until_idle()
    with on_commit():
        health.pause(fifo, "a second report of the same failure", timezone.now())

    [message] = mail.outbox
    assert sorted(message.to) == sorted(CONTACTS)
    assert "Delivery paused" in message.subject
    assert ACCESS_DENIED.message in message.body
    assert fifo.sqs_queue_url in message.body


def test_enable_releases_held_in_order(
    application: Application, fifo: Destination, transport: Script
) -> None:
    queue_events(fifo, [("a1", KEY_A, 1)])
    transport.then("a1", ACCESS_DENIED)
    run_until_idle()
    fifo.refresh_from_db()
    # Published newest first while the destination is paused.
    publish_order(application, "a", "a3", 3)
    publish_order(application, "a", "a2", 2)

    released = health.enable(fifo)
    run_until_idle()

    fifo.refresh_from_db()
    assert released == 2
    assert fifo.state == State.ACTIVE
    assert transport.sent_with_key(KEY_A) == ["a1", "a1", "a2", "a3"]
    assert set(Delivery.objects.values_list("status", flat=True)) == {
        DeliveryStatus.DELIVERED
    }


def test_enable_clears_pause_and_counters(fifo: Destination, transport: Script) -> None:
    queue_events(fifo, [("a1", KEY_A, 1)])
    transport.then("a1", ACCESS_DENIED)
    run_until_idle()

    health.enable(fifo)

    fifo.refresh_from_db()
    assert fifo.paused_at is None
    assert fifo.pause_reason == ""
    assert fifo.consecutive_failures == 0
    # Still failing until an event gets through: the clock restarts at enabling.
    assert fifo.failing_since is not None


def test_enable_sends_waiting_retries_now(fifo: Destination, transport: Script) -> None:
    delivery = queue_events(fifo, [("a1", KEY_A, 1)])["a1"]
    transport.then("a1", THROTTLED)
    run_until_idle()
    pause(fifo)

    health.enable(fifo)

    delivery.refresh_from_db()
    assert delivery.next_attempt_at is not None
    assert delivery.next_attempt_at <= timezone.now()


# Disabling after sustained failure.


def test_consecutive_failures_disable_destination(
    fifo: Destination, transport: Script, settings: Any
) -> None:
    settings.AUTO_DISABLE_AFTER_FAILURES = 3
    queue_events(fifo, [("a1", KEY_A, 1)])
    transport.then("a1", THROTTLED, THROTTLED, THROTTLED)
    for _ in range(2):
        make_due()
        engine.run_once("worker-1")
    fifo.refresh_from_db()
    assert fifo.disabled_at is None

    make_due()
    engine.run_once("worker-1")

    fifo.refresh_from_db()
    assert fifo.disabled_at is not None
    assert fifo.enabled is False
    assert fifo.state == State.DISABLED
    assert "3 in a row" in fifo.disabled_reason
    assert THROTTLED.message in fifo.disabled_reason


def test_disable_mails_last_error(
    fifo: Destination, transport: Script, settings: Any, on_commit: Any
) -> None:
    settings.AUTO_DISABLE_AFTER_FAILURES = 2
    queue_events(fifo, [("a1", KEY_A, 1)])
    transport.then("a1", TIMED_OUT, THROTTLED)

    with on_commit():
        engine.run_once("worker-1")
        make_due()
        engine.run_once("worker-1")

    [message] = mail.outbox
    assert sorted(message.to) == sorted(CONTACTS)
    assert "Destination disabled" in message.subject
    assert THROTTLED.message in message.body


def test_long_failing_destination_disabled(
    fifo: Destination, transport: Script, settings: Any
) -> None:
    settings.AUTO_DISABLE_AFTER_HOURS = 24
    queue_events(fifo, [("a1", KEY_A, 1)])
    fail_for(fifo, hours=25, failures=1)
    transport.then("a1", THROTTLED)

    engine.run_once("worker-1")

    fifo.refresh_from_db()
    assert fifo.disabled_at is not None
    assert "failed for 25.0 hours" in fifo.disabled_reason


def test_recent_failures_leave_destination_enabled(
    fifo: Destination, transport: Script, settings: Any
) -> None:
    settings.AUTO_DISABLE_AFTER_HOURS = 24
    queue_events(fifo, [("a1", KEY_A, 1)])
    fail_for(fifo, hours=23, failures=1)
    transport.then("a1", THROTTLED)

    engine.run_once("worker-1")

    fifo.refresh_from_db()
    assert fifo.disabled_at is None
    assert fifo.consecutive_failures == 2


def test_success_resets_failure_streak(fifo: Destination, transport: Script) -> None:
    queue_events(fifo, [("a1", KEY_A, 1)])
    fail_for(fifo, hours=2, failures=5)

    run_until_idle()

    fifo.refresh_from_db()
    assert fifo.consecutive_failures == 0
    assert fifo.failing_since is None
    assert fifo.last_success_at is not None


def test_sweep_disables_long_failing_destination(
    fifo: Destination, settings: Any
) -> None:
    settings.AUTO_DISABLE_AFTER_HOURS = 24
    fail_for(fifo, hours=25, failures=1)

    disabled = health.sweep_failing_destinations()

    fifo.refresh_from_db()
    assert disabled == 1
    assert fifo.state == State.DISABLED


def test_sweep_leaves_paused_destination_paused(
    fifo: Destination, settings: Any
) -> None:
    settings.AUTO_DISABLE_AFTER_HOURS = 24
    fail_for(fifo, hours=25, failures=1)
    pause(fifo)

    disabled = health.sweep_failing_destinations()

    fifo.refresh_from_db()
    assert disabled == 0
    assert fifo.state == State.PAUSED


def test_enable_after_disable_sends_in_order(
    application: Application, fifo: Destination, transport: Script, settings: Any
) -> None:
    settings.AUTO_DISABLE_AFTER_FAILURES = 1
    queue_events(fifo, [("a1", KEY_A, 1)])
    transport.then("a1", THROTTLED)
    run_until_idle()
    fifo.refresh_from_db()
    publish_order(application, "a", "a2", 2)

    released = health.enable(fifo)
    run_until_idle()

    assert released == 1
    assert transport.sent_with_key(KEY_A) == ["a1", "a1", "a2"]


# Held deliveries for new events.


def test_paused_destination_gets_held_delivery(
    application: Application, fifo: Destination
) -> None:
    pause(fifo)

    result = publish_order(application, "a", "a1", 1)

    delivery = Delivery.objects.get(destination=fifo)
    assert result.held == 1
    assert delivery.status == DeliveryStatus.HELD


def test_disabled_destination_gets_held_delivery(
    application: Application, fifo: Destination
) -> None:
    Destination.objects.filter(pk=fifo.pk).update(
        enabled=False, disabled_at=timezone.now(), disabled_reason="kept failing"
    )

    result = publish_order(application, "a", "a1", 1)

    delivery = Delivery.objects.get(destination=fifo)
    assert result.held == 1
    assert delivery.status == DeliveryStatus.HELD


def test_staff_disabled_destination_gets_none(
    application: Application, fifo: Destination
) -> None:
    health.disable(fifo)

    result = publish_order(application, "a", "a1", 1)

    assert result.recorded == 1
    assert result.deliveries == 0
    assert not Delivery.objects.filter(destination=fifo).exists()


def test_staff_disabling_paused_destination_stops_deliveries(
    application: Application, fifo: Destination
) -> None:
    pause(fifo)
    fifo.refresh_from_db()

    health.disable(fifo)
    result = publish_order(application, "a", "a1", 1)

    fifo.refresh_from_db()
    assert fifo.state == State.OFF
    assert result.deliveries == 0


def test_held_delivery_is_not_claimed(
    application: Application, fifo: Destination
) -> None:
    pause(fifo)
    publish_order(application, "a", "a1", 1)
    Destination.objects.filter(pk=fifo.pk).update(paused_at=None)

    assert engine.claim("worker-1", limit=10) == []


# Test events.


def test_test_event_sent_once_on_transient_failure(
    fifo: Destination, transport: Script
) -> None:
    delivery = send_test_event(fifo, requested_by=None)
    transport.then(delivery.event_id, THROTTLED)

    run_until_idle()

    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.FAILED
    assert delivery.attempt_count == 1


def test_test_event_never_pauses(
    fifo: Destination, transport: Script, on_commit: Any
) -> None:
    delivery = send_test_event(fifo, requested_by=None)
    transport.then(delivery.event_id, ACCESS_DENIED)

    with on_commit():
        run_until_idle()

    fifo.refresh_from_db()
    assert status_of(delivery) == DeliveryStatus.FAILED
    assert fifo.paused_at is None
    assert fifo.consecutive_failures == 0
    assert mail.outbox == []


def test_test_event_never_disables(
    fifo: Destination, transport: Script, settings: Any
) -> None:
    settings.AUTO_DISABLE_AFTER_FAILURES = 1
    delivery = send_test_event(fifo, requested_by=None)
    transport.then(delivery.event_id, THROTTLED)

    run_until_idle()

    fifo.refresh_from_db()
    assert fifo.disabled_at is None
    assert fifo.enabled is True


def test_test_event_reaches_paused_destination(
    fifo: Destination, transport: Script
) -> None:
    pause(fifo)
    delivery = send_test_event(fifo, requested_by=None)

    run_until_idle()

    assert transport.sent == [delivery.event_id]
    assert status_of(delivery) == DeliveryStatus.DELIVERED


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the row lock needs PostgreSQL"
)
@pytest.mark.django_db(transaction=True)
def test_concurrent_successes_recover_once() -> None:
    destination = make_destination(
        make_application(), consecutive_failures=3, failing_since=timezone.now()
    )
    first_done = threading.Event()
    commit_first = threading.Event()
    recovered: dict[str, bool] = {}

    def succeed(name: str, hold: bool) -> None:
        try:
            with transaction.atomic():
                recovered[name] = health._record_success(destination, timezone.now())
                if hold:
                    first_done.set()
                    commit_first.wait(10)
        finally:
            connection.close()

    first = threading.Thread(target=succeed, args=("first", True))
    first.start()
    assert first_done.wait(10)
    # The second waits for the first's row lock, then reads its result.
    second = threading.Thread(target=succeed, args=("second", False))
    second.start()
    time.sleep(0.2)
    commit_first.set()
    first.join(10)
    second.join(10)

    assert recovered == {"first": True, "second": False}
    destination.refresh_from_db()
    assert destination.failing_since is None
    assert destination.consecutive_failures == 0
