"""Each destination kind through the session's Celery worker process.

Test events and published events are read back from the local peers. Failures that
the peers inject are retried by the engine until the event arrives. Permanent errors
are recorded, and pause the destination when they are its own fault.
"""

import json
import re
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import pytest

from delivery.models import Attempt, Delivery, DeliveryStatus, Outcome
from delivery.peers.pubsub import PubSubPeer
from delivery.peers.servicebus import (
    DETACH_FORCED,
    SERVER_BUSY,
    ServiceBusPeer,
    generate_key,
)
from delivery.publishing import parse_envelope, publish
from delivery.testevents import TEST_EVENT_TYPE, send_test_event
from destinations.models import Application, Destination, EntityType, Kind, Stage

from .pubsub_fixtures import PubSubTopic, new_topic
from .servicebus_fixtures import unique_entity_name
from .system_fixtures import (
    SAMPLE_EVENT,
    SAMPLE_OBJECT_KEY,
    pubsub_destination,
    servicebus_destination,
    sqs_destination,
    wait_until,
)

if TYPE_CHECKING:
    from .conftest import PeerQueue, Worker

pytestmark = pytest.mark.django_db(transaction=True)

SAMPLE_TEXT = SAMPLE_EVENT.read_text(encoding="utf-8")
SAMPLE_ID = json.loads(SAMPLE_TEXT)["id"]
# What the partner must receive: the published envelope, byte for byte. Publishing
# strips the whitespace around it.
SAMPLE_BODY = SAMPLE_TEXT.strip().encode()
CONTENT_TYPE = "application/json"
SWEEP_FINISHED = re.compile(r"Task delivery\.tasks\.sweep\[[^\]]+\] succeeded")

MakeQueue = Callable[..., "PeerQueue"]


def publish_sample(application: Application, destination: Destination) -> Delivery:
    publish(application, Stage.TEST, SAMPLE_TEXT)
    return Delivery.objects.get(destination=destination, event_id=SAMPLE_ID)


def attempts_of(delivery: Delivery) -> list[Attempt]:
    return list(delivery.attempts.order_by("started_at", "pk"))


def outcomes(delivery: Delivery) -> list[tuple[str, str]]:
    return [(a.outcome, a.error_kind) for a in attempts_of(delivery)]


def wait_for_attempt(worker: "Worker", delivery: Delivery) -> Attempt:
    """Wait until the worker recorded an attempt of `delivery`; return the first."""
    wait_until(
        lambda: delivery.attempts.exists(),
        f"an attempt of delivery {delivery.pk}",
        describe=lambda: f"The worker's log:\n{worker.log()}",
    )
    return attempts_of(delivery)[0]


@pytest.fixture
def pubsub_topic(local_pubsub_peer: PubSubPeer) -> PubSubTopic:
    return new_topic(local_pubsub_peer.endpoint, ordering=True)


@pytest.fixture
def session_queue(servicebus: ServiceBusPeer) -> str:
    name = unique_entity_name("sessions")
    servicebus.add_queue(name, requires_session=True)
    return name


# Test events and published events, read back from each kind's peer.


def test_sqs_fifo_receives_test_event(
    worker: "Worker", make_sqs_queue: MakeQueue, orders_app: Application
) -> None:
    queue = make_sqs_queue(fifo=True)
    destination = sqs_destination(orders_app, queue)

    delivery = worker.wait_for_delivery(send_test_event(destination, None).pk)

    [message] = queue.receive()
    attributes = message["MessageAttributes"]
    assert delivery.status == DeliveryStatus.DELIVERED
    assert message["Body"].encode() == delivery.event.body()
    assert attributes["event_id"]["StringValue"] == delivery.event.id
    assert attributes["event_type"]["StringValue"] == TEST_EVENT_TYPE
    assert message["Attributes"]["MessageGroupId"] == f"test/{destination.pk}"
    assert message["Attributes"]["MessageDeduplicationId"] == delivery.event.id


def test_sqs_fifo_receives_sample_event(
    worker: "Worker", make_sqs_queue: MakeQueue, orders_app: Application
) -> None:
    queue = make_sqs_queue(fifo=True)
    destination = sqs_destination(orders_app, queue)

    delivery = worker.wait_for_delivery(publish_sample(orders_app, destination).pk)

    [message] = queue.receive()
    attributes = message["MessageAttributes"]
    assert delivery.status == DeliveryStatus.DELIVERED
    assert message["Body"].encode() == SAMPLE_BODY
    assert attributes["event_id"]["StringValue"] == SAMPLE_ID
    assert attributes["event_type"]["StringValue"] == "ACCEPT"
    assert message["Attributes"]["MessageGroupId"] == SAMPLE_OBJECT_KEY
    assert message["Attributes"]["MessageDeduplicationId"] == SAMPLE_ID
    assert attempts_of(delivery)[0].remote_message_id == message["MessageId"]


def test_pubsub_ordering_receives_test_event(
    worker: "Worker", pubsub_topic: PubSubTopic, orders_app: Application
) -> None:
    destination = pubsub_destination(orders_app, pubsub_topic.topic_id)

    delivery = worker.wait_for_delivery(send_test_event(destination, None).pk)

    [message] = pubsub_topic.pull(1)
    assert delivery.status == DeliveryStatus.DELIVERED
    assert bytes(message.data) == delivery.event.body()
    assert message.attributes["event_id"] == delivery.event.id
    assert message.attributes["event_type"] == TEST_EVENT_TYPE
    assert message.ordering_key == f"test/{destination.pk}"


def test_pubsub_ordering_receives_sample_event(
    worker: "Worker", pubsub_topic: PubSubTopic, orders_app: Application
) -> None:
    destination = pubsub_destination(orders_app, pubsub_topic.topic_id)

    delivery = worker.wait_for_delivery(publish_sample(orders_app, destination).pk)

    [message] = pubsub_topic.pull(1)
    assert delivery.status == DeliveryStatus.DELIVERED
    assert bytes(message.data) == SAMPLE_BODY
    assert message.attributes["event_id"] == SAMPLE_ID
    assert message.attributes["event_type"] == "ACCEPT"
    assert message.ordering_key == SAMPLE_OBJECT_KEY
    assert attempts_of(delivery)[0].remote_message_id == message.message_id


def test_servicebus_session_queue_receives_test_event(
    worker: "Worker",
    servicebus: ServiceBusPeer,
    session_queue: str,
    orders_app: Application,
) -> None:
    destination = servicebus_destination(
        orders_app, servicebus.connection_string(), session_queue
    )

    delivery = worker.wait_for_delivery(send_test_event(destination, None).pk)

    [message] = servicebus.messages(session_queue)
    assert delivery.status == DeliveryStatus.DELIVERED
    assert message.body == delivery.event.body()
    assert message.message_id == delivery.event.id
    assert message.content_type == CONTENT_TYPE
    assert message.application_properties["event_id"] == delivery.event.id
    assert message.application_properties["event_type"] == TEST_EVENT_TYPE
    assert message.session_id == f"test/{destination.pk}"
    assert message.partition_key == f"test/{destination.pk}"


def test_servicebus_session_queue_receives_sample_event(
    worker: "Worker",
    servicebus: ServiceBusPeer,
    session_queue: str,
    orders_app: Application,
) -> None:
    destination = servicebus_destination(
        orders_app, servicebus.connection_string(), session_queue
    )

    delivery = worker.wait_for_delivery(publish_sample(orders_app, destination).pk)

    [message] = servicebus.messages(session_queue)
    assert delivery.status == DeliveryStatus.DELIVERED
    assert message.body == SAMPLE_BODY
    assert message.message_id == SAMPLE_ID
    assert message.content_type == CONTENT_TYPE
    assert message.application_properties["event_id"] == SAMPLE_ID
    assert message.application_properties["event_type"] == "ACCEPT"
    assert message.session_id == SAMPLE_OBJECT_KEY
    assert message.partition_key == SAMPLE_OBJECT_KEY
    assert attempts_of(delivery)[0].remote_message_id == SAMPLE_ID


@pytest.mark.parametrize("sessions", [True, False], ids=["sessions", "partitioned"])
def test_servicebus_topic_receives_sample_event(
    worker: "Worker",
    servicebus: ServiceBusPeer,
    orders_app: Application,
    sessions: bool,
) -> None:
    topic = unique_entity_name("events")
    servicebus.add_topic(topic, requires_session=sessions)
    destination = servicebus_destination(
        orders_app,
        servicebus.connection_string(),
        topic,
        entity_type=EntityType.TOPIC,
        sessions=sessions,
    )

    delivery = worker.wait_for_delivery(publish_sample(orders_app, destination).pk)

    [message] = servicebus.messages(topic)
    assert delivery.status == DeliveryStatus.DELIVERED
    assert message.body == SAMPLE_BODY
    assert message.message_id == SAMPLE_ID
    assert message.content_type == CONTENT_TYPE
    assert message.application_properties["event_id"] == SAMPLE_ID
    assert message.application_properties["event_type"] == "ACCEPT"
    assert message.session_id == (SAMPLE_OBJECT_KEY if sessions else None)
    assert message.partition_key == SAMPLE_OBJECT_KEY


# Transient failures, retried by the engine until the event arrives.


def test_pubsub_unavailable_retried_until_published(
    worker: "Worker",
    local_pubsub_peer: PubSubPeer,
    pubsub_topic: PubSubTopic,
    orders_app: Application,
) -> None:
    destination = pubsub_destination(orders_app, pubsub_topic.topic_id)
    local_pubsub_peer.fail_next_publishes(3, grpc.StatusCode.UNAVAILABLE)

    delivery = worker.wait_for_delivery(publish_sample(orders_app, destination).pk)

    [message] = pubsub_topic.pull(1)
    unavailable = (Outcome.TRANSIENT_ERROR, "unavailable")
    assert delivery.status == DeliveryStatus.DELIVERED
    assert outcomes(delivery) == [unavailable] * 3 + [(Outcome.SUCCESS, "")]
    assert bytes(message.data) == SAMPLE_BODY
    assert message.ordering_key == SAMPLE_OBJECT_KEY


def test_servicebus_server_busy_retried_until_sent(
    worker: "Worker",
    servicebus: ServiceBusPeer,
    session_queue: str,
    orders_app: Application,
) -> None:
    destination = servicebus_destination(
        orders_app, servicebus.connection_string(), session_queue
    )
    servicebus.fail_next(2, SERVER_BUSY, entity=session_queue)

    delivery = worker.wait_for_delivery(publish_sample(orders_app, destination).pk)

    busy = (Outcome.TRANSIENT_ERROR, "server_busy")
    assert delivery.status == DeliveryStatus.DELIVERED
    assert outcomes(delivery) == [busy, busy, (Outcome.SUCCESS, "")]
    assert [m.message_id for m in servicebus.messages(session_queue)] == [SAMPLE_ID]


def test_servicebus_detach_retried_until_sent(
    worker: "Worker",
    servicebus: ServiceBusPeer,
    session_queue: str,
    orders_app: Application,
) -> None:
    destination = servicebus_destination(
        orders_app, servicebus.connection_string(), session_queue
    )
    servicebus.fail_next(1, DETACH_FORCED, detach=True, entity=session_queue)

    delivery = worker.wait_for_delivery(publish_sample(orders_app, destination).pk)

    failed = (Outcome.TRANSIENT_ERROR, "connection_failed")
    assert delivery.status == DeliveryStatus.DELIVERED
    assert outcomes(delivery) == [failed, (Outcome.SUCCESS, "")]
    assert [m.message_id for m in servicebus.messages(session_queue)] == [SAMPLE_ID]


def test_servicebus_idle_detach_reconnects_sender(
    worker: "Worker",
    servicebus: ServiceBusPeer,
    session_queue: str,
    orders_app: Application,
) -> None:
    destination = servicebus_destination(
        orders_app, servicebus.connection_string(), session_queue
    )
    first = worker.wait_for_delivery(publish_sample(orders_app, destination).pk)
    servicebus.detach_senders()

    later = json.loads(SAMPLE_TEXT)
    later["id"] = f"later-{uuid.uuid4().hex[:8]}"
    publish(orders_app, Stage.TEST, later)
    second = Delivery.objects.get(destination=destination, event_id=later["id"])
    second = worker.wait_for_delivery(second.pk)

    recorded = servicebus.messages(session_queue)
    assert first.status == DeliveryStatus.DELIVERED
    assert second.status == DeliveryStatus.DELIVERED
    # The transport reconnects within the send: no failed attempt is recorded.
    assert outcomes(second) == [(Outcome.SUCCESS, "")]
    assert [m.message_id for m in recorded] == [SAMPLE_ID, later["id"]]
    assert servicebus.connections_opened == 2


# Permanent errors: recorded with their kind and message, pausing the destination
# when it is the destination's own fault.


def missing_queue_destination(application: Application) -> Destination:
    """Return a FIFO destination whose queue was never created."""
    name = f"gone-{uuid.uuid4().hex[:12]}.fifo"
    return Destination.objects.create(
        application=application,
        stage=Stage.TEST,
        kind=Kind.SQS,
        name="missing queue",
        sqs_queue_url=f"https://sqs.eu-west-1.amazonaws.com/123456789012/{name}",
        sqs_fifo=True,
    )


def assert_paused_by(destination: Destination, attempt: Attempt) -> None:
    destination.refresh_from_db()
    assert attempt.outcome == Outcome.PERMANENT_ERROR
    assert destination.paused_at is not None
    assert destination.pause_reason == attempt.message
    assert destination.last_error == f"{attempt.error_kind}: {attempt.message}"


def test_sqs_missing_queue_pauses_destination(
    worker: "Worker", orders_app: Application
) -> None:
    destination = missing_queue_destination(orders_app)

    delivery = publish_sample(orders_app, destination)
    attempt = wait_for_attempt(worker, delivery)

    delivery.refresh_from_db()
    assert attempt.error_kind == "queue_not_found"
    assert destination.sqs_queue_url in attempt.message
    assert "create the queue" in attempt.message
    assert_paused_by(destination, attempt)
    # Paused, not dropped: the event waits first in line for its key.
    assert delivery.status == DeliveryStatus.PENDING


def test_pubsub_missing_topic_pauses_destination(
    worker: "Worker", local_pubsub_peer: PubSubPeer, orders_app: Application
) -> None:
    topic_id = f"never-created-{uuid.uuid4().hex[:8]}"
    destination = pubsub_destination(orders_app, topic_id)

    delivery = publish_sample(orders_app, destination)
    attempt = wait_for_attempt(worker, delivery)

    delivery.refresh_from_db()
    assert attempt.error_kind == "topic_not_found"
    assert destination.target in attempt.message
    assert "Create the topic" in attempt.message
    assert_paused_by(destination, attempt)
    assert delivery.status == DeliveryStatus.PENDING


def test_pubsub_permission_denied_pauses_destination(
    worker: "Worker",
    local_pubsub_peer: PubSubPeer,
    pubsub_topic: PubSubTopic,
    orders_app: Application,
) -> None:
    destination = pubsub_destination(orders_app, pubsub_topic.topic_id)
    local_pubsub_peer.fail_next_publishes(1, grpc.StatusCode.PERMISSION_DENIED)

    delivery = publish_sample(orders_app, destination)
    attempt = wait_for_attempt(worker, delivery)

    assert attempt.error_kind == "access_denied"
    assert "roles/pubsub.publisher" in attempt.message
    assert_paused_by(destination, attempt)


@pytest.mark.parametrize(
    ("case", "kind", "wording"),
    [
        ("missing entity", "entity_not_found", "does not exist"),
        ("wrong key", "unauthorized", "Copy the connection string"),
        ("no session id", "session_required", "Turn on 'sessions required'"),
    ],
)
def test_servicebus_rejection_pauses_destination(
    worker: "Worker",
    servicebus: ServiceBusPeer,
    orders_app: Application,
    case: str,
    kind: str,
    wording: str,
) -> None:
    entity = unique_entity_name("orders")
    connection_string = servicebus.connection_string()
    sessions = True
    if case == "wrong key":
        servicebus.add_queue(entity, requires_session=True)
        connection_string = servicebus.connection_string(key=generate_key())
    elif case == "no session id":
        servicebus.add_queue(entity, requires_session=True)
        sessions = False
    destination = servicebus_destination(
        orders_app, connection_string, entity, sessions=sessions, partitioning=False
    )

    delivery = publish_sample(orders_app, destination)
    attempt = wait_for_attempt(worker, delivery)

    assert attempt.error_kind == kind
    assert f"queue '{entity}'" in attempt.message
    assert wording in attempt.message
    assert servicebus.key not in attempt.message
    assert_paused_by(destination, attempt)
    assert servicebus.messages(entity) == []


def test_servicebus_too_large_fails_only_event(
    worker: "Worker",
    servicebus: ServiceBusPeer,
    orders_app: Application,
) -> None:
    entity = unique_entity_name("small")
    # The sample is 630 bytes. The destination's own limit is the default 256 KB, so
    # the transport sends it and the peer rejects it.
    servicebus.add_queue(entity, requires_session=True, max_message_size=400)
    destination = servicebus_destination(
        orders_app, servicebus.connection_string(), entity
    )
    small = {
        "id": f"small-{uuid.uuid4().hex[:8]}",
        "time": "2025-03-03T08:05:00.000Z",
        "type": "ACCEPT",
        "data": {
            "channel_id": "4102",
            "channel_store_id": "st-80231",
            "channel_order_id": "FKO-2025-000001-A",
        },
    }

    large = publish_sample(orders_app, destination)
    publish(orders_app, Stage.TEST, small)
    later = Delivery.objects.get(destination=destination, event_id=small["id"])
    large = worker.wait_for_delivery(large.pk)
    later = worker.wait_for_delivery(later.pk)

    [attempt] = attempts_of(large)
    destination.refresh_from_db()
    assert parse_envelope(small).object_key == SAMPLE_OBJECT_KEY
    assert large.status == DeliveryStatus.FAILED
    assert attempt.outcome == Outcome.PERMANENT_ERROR
    assert attempt.error_kind == "too_large"
    assert "too large" in attempt.message
    assert destination.paused_at is None
    # The event behind it, of the same order, goes out next.
    assert later.status == DeliveryStatus.DELIVERED
    assert [m.message_id for m in servicebus.messages(entity)] == [small["id"]]


def test_test_event_failure_never_pauses(
    worker: "Worker", servicebus: ServiceBusPeer, orders_app: Application
) -> None:
    entity = unique_entity_name("missing")
    destination = servicebus_destination(
        orders_app, servicebus.connection_string(), entity
    )

    delivery = worker.wait_for_delivery(send_test_event(destination, None).pk)

    [attempt] = attempts_of(delivery)
    destination.refresh_from_db()
    assert delivery.status == DeliveryStatus.FAILED
    assert attempt.error_kind == "entity_not_found"
    assert destination.paused_at is None


def sweeps_finished(log: str) -> int:
    return len(SWEEP_FINISHED.findall(log))


def test_paused_destination_stops_waking_workers(
    worker: "Worker", orders_app: Application
) -> None:
    destination = missing_queue_destination(orders_app)
    delivery = publish_sample(orders_app, destination)
    wait_for_attempt(worker, delivery)
    # Wake-up messages queued before the pause are consumed before the next sweep.
    settled = worker.log_size()
    wait_until(lambda: sweeps_finished(worker.log(settled)) >= 1, "one more sweep")
    start = worker.log_size()

    wait_until(lambda: sweeps_finished(worker.log(start)) >= 3, "three more sweeps")

    destination.refresh_from_db()
    assert destination.paused_at is not None
    # The paused destination's delivery is due, but no worker can send it.
    assert "Task delivery.tasks.send_due[" not in worker.log(start)
