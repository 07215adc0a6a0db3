"""Test events, from the admin through a real Celery worker process to moto's SQS
server, read back over the wire."""

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from django.test import Client
from django.urls import reverse

from delivery.ids import ALPHABET, new_ulid, ulid_timestamp_ms
from delivery.models import (
    Attempt,
    BulkJob,
    Delivery,
    DeliveryStatus,
    Event,
    Outcome,
)
from delivery.tasks import wake_workers
from delivery.testevents import TEST_EVENT_TYPE, send_test_event
from destinations.models import Application, Destination, Kind, Stage

from .bulk_waits import wait_for_job

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from .conftest import PeerQueue, Worker

MakeQueue = Callable[..., "PeerQueue"]
LARGE_FIXTURE = (
    Path(__file__).parent / "fixtures" / "order_action_cancel_large_400_lines.json"
)

# The worker reads only committed rows, so these tests commit for real.
worker_db = pytest.mark.django_db(transaction=True)


@pytest.fixture
def application() -> Application:
    return Application.objects.create(name="Orders", slug="orders")


@pytest.fixture
def staff(django_user_model: type["User"]) -> "User":
    return django_user_model.objects.create_superuser(
        username="staff", email="staff@example.com", password="unused-password-1"
    )


def sqs_destination(
    application: Application, queue: "PeerQueue", *, enabled: bool = True
) -> Destination:
    return Destination.objects.create(
        application=application,
        stage=Stage.TEST,
        kind=Kind.SQS,
        name=f"queue {queue.name}",
        sqs_queue_url=queue.url,
        sqs_fifo=queue.fifo,
        enabled=enabled,
    )


def only_attempt(delivery: Delivery) -> Attempt:
    attempts = list(delivery.attempts.all())
    assert len(attempts) == 1
    return attempts[0]


def attribute(message: dict[str, Any], name: str) -> str:
    return str(message["MessageAttributes"][name]["StringValue"])


# ULIDs.


def test_new_ulid_is_lowercase_crockford() -> None:
    ulid = new_ulid()
    assert len(ulid) == 26
    assert set(ulid) <= set(ALPHABET)


def test_new_ulid_encodes_milliseconds() -> None:
    # The fixture envelope's id was made at its own time, 2025-03-03T11:00:00.000Z.
    assert ulid_timestamp_ms("01jndtk9w059kn7gy6jqw0m0bn") == 1_740_999_600_000
    assert new_ulid(1_740_999_600_000)[:10] == "01jndtk9w0"


def test_new_ulids_differ_within_millisecond() -> None:
    assert new_ulid(1_740_999_600_000) != new_ulid(1_740_999_600_000)


def test_new_ulid_rejects_negative_time() -> None:
    with pytest.raises(ValueError, match="timestamp_ms -1"):
        new_ulid(-1)


# Recording a test event.


@pytest.mark.django_db
def test_send_test_event_records_event(
    application: Application,
    make_sqs_queue: MakeQueue,
    staff: "User",
    django_capture_on_commit_callbacks: Any,
) -> None:
    destination = sqs_destination(application, make_sqs_queue())
    before_ms = time.time_ns() // 1_000_000

    with django_capture_on_commit_callbacks() as callbacks:
        delivery = send_test_event(destination, requested_by=staff)

    event = delivery.event
    assert len(callbacks) == 1
    assert event.is_test is True
    assert event.type == TEST_EVENT_TYPE
    assert event.object_key == f"test/{destination.pk}"
    assert event.application == application
    assert event.stage == Stage.TEST
    assert len(event.id) == 26
    assert ulid_timestamp_ms(event.id) >= before_ms
    assert event.data["destination"] == destination.name
    assert event.data["application"] == "orders"
    assert event.data["stage"] == "TEST"
    assert event.data["requested_by"] == "staff"
    assert event.data["message"]
    assert delivery.destination == destination
    assert delivery.status == DeliveryStatus.PENDING


@pytest.mark.django_db
def test_send_test_event_reaches_one_destination(
    application: Application, make_sqs_queue: MakeQueue, staff: "User"
) -> None:
    destination = sqs_destination(application, make_sqs_queue())
    sqs_destination(application, make_sqs_queue())

    delivery = send_test_event(destination, requested_by=staff)

    assert Delivery.objects.filter(event=delivery.event).count() == 1


@pytest.mark.django_db
def test_send_test_event_without_user(
    application: Application, make_sqs_queue: MakeQueue
) -> None:
    destination = sqs_destination(application, make_sqs_queue())

    delivery = send_test_event(destination, requested_by=None)

    assert delivery.event.data["requested_by"] == ""


# Through the worker.


@worker_db
def test_worker_delivers_fifo_test_event(
    worker: "Worker",
    make_sqs_queue: MakeQueue,
    application: Application,
    staff: "User",
) -> None:
    queue = make_sqs_queue(fifo=True)
    destination = sqs_destination(application, queue)

    delivery = worker.wait_for_delivery(send_test_event(destination, staff).pk)

    messages = queue.receive()
    assert len(messages) == 1
    message = messages[0]
    event = delivery.event
    assert message["Body"] == event.body().decode()
    assert json.loads(message["Body"])["type"] == TEST_EVENT_TYPE
    assert attribute(message, "event_id") == event.id
    assert attribute(message, "event_type") == TEST_EVENT_TYPE
    assert message["Attributes"]["MessageGroupId"] == f"test/{destination.pk}"
    assert message["Attributes"]["MessageDeduplicationId"] == event.id
    attempt = only_attempt(delivery)
    assert attempt.outcome == Outcome.SUCCESS
    assert attempt.remote_message_id == message["MessageId"]
    assert delivery.status == DeliveryStatus.DELIVERED
    assert delivery.attempt_count == 1


@worker_db
def test_worker_delivers_standard_test_event(
    worker: "Worker",
    make_sqs_queue: MakeQueue,
    application: Application,
    staff: "User",
) -> None:
    queue = make_sqs_queue()
    destination = sqs_destination(application, queue)

    delivery = worker.wait_for_delivery(send_test_event(destination, staff).pk)

    messages = queue.receive()
    assert len(messages) == 1
    message = messages[0]
    assert message["Body"] == delivery.event.body().decode()
    assert attribute(message, "event_id") == delivery.event.id
    assert attribute(message, "event_type") == TEST_EVENT_TYPE
    assert "MessageGroupId" not in message["Attributes"]
    attempt = only_attempt(delivery)
    assert attempt.outcome == Outcome.SUCCESS
    assert attempt.remote_message_id == message["MessageId"]


@worker_db
def test_worker_sends_disabled_destination_test(
    worker: "Worker",
    make_sqs_queue: MakeQueue,
    application: Application,
    staff: "User",
) -> None:
    queue = make_sqs_queue()
    destination = sqs_destination(application, queue, enabled=False)

    delivery = worker.wait_for_delivery(send_test_event(destination, staff).pk)

    assert delivery.status == DeliveryStatus.DELIVERED
    assert len(queue.receive()) == 1


@worker_db
def test_worker_records_missing_queue(
    worker: "Worker", application: Application, staff: "User"
) -> None:
    url = "https://sqs.eu-west-1.amazonaws.com/123456789012/never-created"
    destination = Destination.objects.create(
        application=application,
        stage=Stage.TEST,
        kind=Kind.SQS,
        name="missing",
        sqs_queue_url=url,
    )

    delivery = worker.wait_for_delivery(send_test_event(destination, staff).pk)

    attempt = only_attempt(delivery)
    assert attempt.outcome == Outcome.PERMANENT_ERROR
    assert attempt.error_kind == "queue_not_found"
    assert url in attempt.message
    assert delivery.status == DeliveryStatus.FAILED


def publish_fixture(destination: Destination) -> Delivery:
    """Record the large fixture envelope as an event for `destination`, and queue
    its delivery."""
    envelope = json.loads(LARGE_FIXTURE.read_bytes())
    event = Event.objects.create(
        id=envelope["id"],
        application=destination.application,
        stage=destination.stage,
        type=envelope["type"],
        object_key=envelope["data"]["channel_order_id"],
        time=datetime.fromisoformat(envelope["time"]).astimezone(UTC),
        data=envelope["data"],
    )
    delivery = Delivery.objects.create(
        event=event, destination=destination, next_attempt_at=event.time
    )
    wake_workers()
    return delivery


@worker_db
def test_worker_delivers_large_fixture_intact(
    worker: "Worker", make_sqs_queue: MakeQueue, application: Application
) -> None:
    queue = make_sqs_queue(max_size=262_144)
    destination = sqs_destination(application, queue)

    delivery = worker.wait_for_delivery(publish_fixture(destination).pk)

    messages = queue.receive()
    assert len(messages) == 1
    body = messages[0]["Body"]
    assert body == delivery.event.body().decode()
    assert json.loads(body) == json.loads(LARGE_FIXTURE.read_bytes())
    assert len(body.encode()) == 230_988
    attempt = only_attempt(delivery)
    assert attempt.outcome == Outcome.SUCCESS
    assert attempt.remote_message_id == messages[0]["MessageId"]


@worker_db
def test_worker_rejects_fixture_over_queue_limit(
    worker: "Worker", make_sqs_queue: MakeQueue, application: Application
) -> None:
    queue = make_sqs_queue(max_size=230_000)
    destination = sqs_destination(application, queue)

    delivery = worker.wait_for_delivery(publish_fixture(destination).pk)

    attempt = only_attempt(delivery)
    assert attempt.outcome == Outcome.PERMANENT_ERROR
    assert attempt.error_kind == "too_large"
    assert "230,000 bytes" in attempt.message
    assert queue.receive() == []


# Through the admin.


@worker_db
def test_admin_action_sends_test_events(
    worker: "Worker",
    make_sqs_queue: MakeQueue,
    application: Application,
    staff: "User",
    client: Client,
) -> None:
    queues = [make_sqs_queue(fifo=True), make_sqs_queue()]
    destinations = [sqs_destination(application, queue) for queue in queues]
    client.force_login(staff)

    response = client.post(
        reverse("admin:destinations_destination_changelist"),
        {
            "action": "send_test_events",
            "_selected_action": [destination.pk for destination in destinations],
        },
    )

    assert response.status_code == 302
    wait_for_job(worker, BulkJob.objects.get().pk)
    for destination, queue in zip(destinations, queues, strict=True):
        created = Delivery.objects.get(destination=destination, event__is_test=True)
        delivery = worker.wait_for_delivery(created.pk)
        assert delivery.status == DeliveryStatus.DELIVERED
        assert delivery.event.data["requested_by"] == "staff"
        messages = queue.receive()
        assert len(messages) == 1
        assert messages[0]["Body"] == delivery.event.body().decode()


@worker_db
def test_admin_button_sends_test_event(
    worker: "Worker",
    make_sqs_queue: MakeQueue,
    application: Application,
    staff: "User",
    client: Client,
) -> None:
    queue = make_sqs_queue(fifo=True)
    destination = sqs_destination(application, queue, enabled=False)
    client.force_login(staff)

    response = client.post(
        reverse("admin:destinations_destination_send_test", args=[destination.pk])
    )

    assert response.status_code == 302
    assert response["Location"] == reverse(
        "admin:destinations_destination_change", args=[destination.pk]
    )
    created = Delivery.objects.get(destination=destination, event__is_test=True)
    delivery = worker.wait_for_delivery(created.pk)
    attempt = only_attempt(delivery)
    assert attempt.outcome == Outcome.SUCCESS
    messages = queue.receive()
    assert len(messages) == 1
    assert attempt.remote_message_id == messages[0]["MessageId"]
    assert messages[0]["Attributes"]["MessageGroupId"] == f"test/{destination.pk}"
