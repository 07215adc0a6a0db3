"""Crashes and outages through real Celery worker processes: peers that fail or go
away, a worker killed mid-batch, a broker restarted. Every event still arrives, in
order per object, because the database is the only record that counts.

Each test starts its own workers, so the session's worker is stopped meanwhile.
Run with DATABASE_URL=postgres://... and CELERY_BROKER_URL=redis://... to test
PostgreSQL and Redis; the Redis restart test brings its own redis-server.
"""

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from django.conf import settings
from django.core.management import call_command

from delivery.models import Attempt, Delivery, DeliveryStatus, Outcome
from delivery.peers.pubsub import PubSubPeer
from delivery.peers.servicebus import (
    DETACH_FORCED,
    SERVER_BUSY,
    ServiceBusPeer,
    start_servicebus_peer,
)
from delivery.publishing import publish, publish_many
from destinations.models import Application, Destination, Stage

from .pubsub_fixtures import PubSubTopic, new_topic
from .servicebus_fixtures import unique_entity_name
from .system_fixtures import (
    SAMPLE_EVENT,
    SAMPLE_OBJECT_KEY,
    STREAM,
    RedisServer,
    SqsServerOnPort,
    Stream,
    assert_stream_delivered,
    delivered_count,
    describe_deliveries,
    kill,
    load_stream,
    pubsub_destination,
    read_pubsub_topic,
    read_servicebus_entity,
    read_sqs_queue,
    servicebus_destination,
    sqs_destination,
    sqs_environment,
    status_counts,
    wait_until,
    wait_until_finished,
)

if TYPE_CHECKING:
    from .conftest import PeerQueue, Worker

pytestmark = pytest.mark.django_db(transaction=True)

StartWorker = Callable[..., "Worker"]
MakeQueue = Callable[..., "PeerQueue"]

# Events of the stream that the crash and restart tests publish: enough for several
# claims per worker, few enough to keep each test to seconds.
SUBSET = 150


@pytest.fixture
def pubsub_topic(local_pubsub_peer: PubSubPeer) -> PubSubTopic:
    return new_topic(local_pubsub_peer.endpoint, ordering=True)


@pytest.fixture
def session_queue(servicebus: ServiceBusPeer) -> str:
    name = unique_entity_name("sessions")
    servicebus.add_queue(name, requires_session=True)
    return name


def transient_kinds(destination: Destination) -> set[str]:
    """Return the error kinds of the transient failures recorded for `destination`."""
    attempts = Attempt.objects.filter(
        delivery__destination=destination, outcome=Outcome.TRANSIENT_ERROR
    )
    return set(attempts.values_list("error_kind", flat=True))


def has_transient(destination: Destination, kind: str) -> Callable[[], bool]:
    return lambda: kind in transient_kinds(destination)


def all_delivered(destinations: list[Destination]) -> dict[str, dict[str, int]]:
    """Return the status counts of deliveries that are not delivered, by name."""
    counts = status_counts(destinations)
    return {
        name: {status: n for status, n in by_status.items() if status != "delivered"}
        for name, by_status in counts.items()
        if set(by_status) != {"delivered"}
    }


def publish_stream(application: Application, stream: Stream) -> None:
    publish_many(application, Stage.TEST, stream.envelopes)


# SQS: a transient outage of the endpoint, retried through the worker.


def test_sqs_endpoint_opening_later_delivers(
    start_worker: StartWorker,
    sqs_server_on_port: SqsServerOnPort,
    make_sqs_queue: MakeQueue,
    orders_app: Application,
) -> None:
    queue = make_sqs_queue(fifo=True)
    destination = sqs_destination(orders_app, queue)
    # Nothing listens on the port yet: connections are refused.
    start_worker("sqs-later", **sqs_environment(sqs_server_on_port.endpoint_url))

    publish(orders_app, Stage.TEST, SAMPLE_EVENT.read_text(encoding="utf-8"))
    wait_until(
        has_transient(destination, "connection_failed"),
        "a refused SQS connection",
        describe=lambda: describe_deliveries([destination]),
    )
    sqs_server_on_port.start()
    wait_until_finished([destination])

    delivery = Delivery.objects.get(destination=destination)
    attempts = list(delivery.attempts.order_by("started_at", "pk"))
    [message] = read_sqs_queue(queue)
    destination.refresh_from_db()
    assert delivery.status == DeliveryStatus.DELIVERED
    assert {a.error_kind for a in attempts[:-1]} == {"connection_failed"}
    assert attempts[-1].outcome == Outcome.SUCCESS
    assert destination.paused_at is None
    assert message.key == SAMPLE_OBJECT_KEY
    assert message.body == SAMPLE_EVENT.read_text(encoding="utf-8").strip().encode()


# The whole stream to each ordered kind, with failures along the way.


def test_stream_arrives_in_order_despite_failures(
    start_worker: StartWorker,
    sqs_server_on_port: SqsServerOnPort,
    make_sqs_queue: MakeQueue,
    local_pubsub_peer: PubSubPeer,
    pubsub_topic: PubSubTopic,
    servicebus: ServiceBusPeer,
    session_queue: str,
    orders_app: Application,
) -> None:
    stream = load_stream()
    queue = make_sqs_queue(fifo=True)
    fifo = sqs_destination(orders_app, queue)
    ordered_topic = pubsub_destination(orders_app, pubsub_topic.topic_id)
    sessions = servicebus_destination(
        orders_app, servicebus.connection_string(), session_queue
    )
    destinations = [fifo, ordered_topic, sessions]
    # Pub/Sub publishes one ordering key per request, so each failure hits one key;
    # Service Bus sends one session per batch.
    local_pubsub_peer.fail_next_publishes(8, grpc.StatusCode.UNAVAILABLE)
    servicebus.fail_next(4, SERVER_BUSY, entity=session_queue)
    servicebus.fail_next(1, DETACH_FORCED, detach=True, entity=session_queue)
    sqs_server_on_port.start()
    # Two workers claim from the same table at once, as in production.
    for name in ("stream-a", "stream-b"):
        start_worker(name, **sqs_environment(sqs_server_on_port.endpoint_url))

    call_command(
        "publish_events",
        str(STREAM),
        "--application",
        orders_app.slug,
        "--stage",
        Stage.TEST,
    )
    # Take the SQS endpoint away while the worker is sending, then bring it back.
    wait_until(lambda: delivered_count(fifo) >= 20, "the first SQS deliveries")
    sqs_server_on_port.stop()
    wait_until(
        has_transient(fifo, "connection_failed"),
        "a refused SQS connection",
        describe=lambda: describe_deliveries(destinations),
    )
    sqs_server_on_port.start()
    wait_until_finished(destinations, timeout=150)

    assert Delivery.objects.count() == 3 * len(stream.envelopes)
    assert all_delivered(destinations) == {}
    assert transient_kinds(fifo) == {"connection_failed"}
    assert transient_kinds(ordered_topic) == {"unavailable"}
    assert transient_kinds(sessions) == {"server_busy", "connection_failed"}
    sqs_messages = read_sqs_queue(queue)
    assert_stream_delivered(sqs_messages, stream)
    assert [m.deduplication_id for m in sqs_messages] == [
        m.event_id for m in sqs_messages
    ]
    assert_stream_delivered(read_pubsub_topic(local_pubsub_peer, pubsub_topic), stream)
    assert_stream_delivered(read_servicebus_entity(servicebus, session_queue), stream)


# A worker killed with SIGKILL in the middle of a batch.


def test_killed_worker_loses_no_event(
    start_worker: StartWorker,
    make_sqs_queue: MakeQueue,
    local_pubsub_peer: PubSubPeer,
    pubsub_topic: PubSubTopic,
    servicebus: ServiceBusPeer,
    session_queue: str,
    orders_app: Application,
) -> None:
    stream = load_stream(SUBSET)
    queue = make_sqs_queue(fifo=True)
    # Created last, so the worker sends to Service Bus after the other two in each
    # round, and hangs there on the send the peer leaves unanswered.
    fifo = sqs_destination(orders_app, queue)
    ordered_topic = pubsub_destination(orders_app, pubsub_topic.topic_id)
    sessions = servicebus_destination(
        orders_app, servicebus.connection_string(), session_queue
    )
    destinations = [fifo, ordered_topic, sessions]
    servicebus.ignore_next(1, entity=session_queue)
    doomed = start_worker("doomed", DELIVERY_LEASE_SECONDS="3", SERVICEBUS_TIMEOUT="60")

    publish_stream(orders_app, stream)
    stuck = Delivery.objects.filter(destination=sessions, status=DeliveryStatus.SENDING)
    wait_until(
        lambda: stuck.exists() and delivered_count(fifo) > 0,
        "the worker to hang sending to Service Bus",
        describe=lambda: describe_deliveries(destinations),
    )
    # The sender link is attached; the send's transfer follows at once and the peer
    # leaves it unanswered. The pause lets the transfer reach the peer, or the next
    # worker's first send would be the one left unanswered.
    wait_until(lambda: servicebus.attach_count >= 3, "the Service Bus sender link")
    time.sleep(1)
    in_flight = set(
        Delivery.objects.filter(status=DeliveryStatus.SENDING).values_list(
            "pk", flat=True
        )
    )
    kill(doomed)
    start_worker("successor")
    wait_until_finished(destinations)

    released = Attempt.objects.filter(error_kind="lease_expired")
    sqs_messages = read_sqs_queue(queue)
    assert doomed.process.returncode == -9
    assert in_flight
    assert set(released.values_list("delivery_id", flat=True)) >= in_flight
    assert all_delivered(destinations) == {}
    assert_stream_delivered(sqs_messages, stream)
    assert [m.deduplication_id for m in sqs_messages] == [
        m.event_id for m in sqs_messages
    ]
    assert_stream_delivered(read_pubsub_topic(local_pubsub_peer, pubsub_topic), stream)
    assert_stream_delivered(read_servicebus_entity(servicebus, session_queue), stream)


# The broker restarted while the worker is busy.


def test_redis_restart_loses_no_event(
    start_worker: StartWorker,
    redis_server: RedisServer,
    make_sqs_queue: MakeQueue,
    local_pubsub_peer: PubSubPeer,
    pubsub_topic: PubSubTopic,
    orders_app: Application,
    tmp_path: Path,
) -> None:
    stream = load_stream(SUBSET)
    queue = make_sqs_queue(fifo=True)
    fifo = sqs_destination(orders_app, queue)
    ordered_topic = pubsub_destination(orders_app, pubsub_topic.topic_id)
    destinations = [fifo, ordered_topic]
    half = len(stream.envelopes) // 2
    later_lines = tmp_path / "later.jsonl"
    later_lines.write_bytes(
        b"\n".join(stream.bodies[e.id] for e in stream.envelopes[half:])
    )
    # Small claims and short rounds make the worker go back to the broker often.
    worker = start_worker(
        "redis",
        CELERY_BROKER_URL=redis_server.url,
        DELIVERY_CLAIM_SIZE="3",
        DELIVERY_DRAIN_SECONDS="0.2",
    )

    publish_many(orders_app, Stage.TEST, stream.envelopes[:half])
    wait_until(
        lambda: sum(delivered_count(d) for d in destinations) >= half // 2,
        "some deliveries",
        describe=lambda: describe_deliveries(destinations),
    )
    log_start = worker.log_size()
    redis_server.stop()
    # The rest is published while Redis is down: recorded, but no worker is woken.
    command = [sys.executable, "manage.py", "publish_events", str(later_lines)]
    command += ["--application", orders_app.slug, "--stage", Stage.TEST]
    published = subprocess.run(
        command,
        cwd=settings.BASE_DIR,
        env=worker.environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Celery beat in the worker cannot queue the sweep either.
    wait_until(
        lambda: "Couldn't apply scheduled task sweep" in worker.log(log_start),
        "the worker's beat to miss a sweep",
        describe=lambda: worker.log(log_start),
    )
    delivered_while_down = sum(delivered_count(d) for d in destinations)
    redis_server.start()
    wait_until_finished(destinations)

    total = len(destinations) * len(stream.envelopes)
    assert published.returncode == 0
    assert f"{len(stream.envelopes) - half} events recorded" in published.stdout
    assert "Could not queue a wake-up message" in published.stderr
    assert delivered_while_down < total
    assert worker.process.poll() is None
    assert all_delivered(destinations) == {}
    assert_stream_delivered(read_sqs_queue(queue), stream)
    assert_stream_delivered(read_pubsub_topic(local_pubsub_peer, pubsub_topic), stream)


# A Service Bus namespace down for a while, and back.


@pytest.fixture
def own_servicebus_peers() -> Iterator[list[ServiceBusPeer]]:
    """A list to put Service Bus peers in; each is stopped after the test."""
    peers: list[ServiceBusPeer] = []
    yield peers
    for peer in peers:
        peer.stop()


def test_servicebus_outage_while_publishing(
    start_worker: StartWorker,
    own_servicebus_peers: list[ServiceBusPeer],
    orders_app: Application,
) -> None:
    stream = load_stream(SUBSET)
    entity = unique_entity_name("sessions")
    first = start_servicebus_peer("127.0.0.1", 0, session_queues=[entity])
    own_servicebus_peers.append(first)
    destination = servicebus_destination(orders_app, first.connection_string(), entity)
    start_worker("outage")
    third = len(stream.envelopes) // 3
    before = stream.envelopes[:third]
    during = stream.envelopes[third : 2 * third]
    after = stream.envelopes[2 * third :]

    publish_many(orders_app, Stage.TEST, before)
    wait_until(lambda: delivered_count(destination) > 0, "the first deliveries")
    first.stop()
    publish_many(orders_app, Stage.TEST, during)
    wait_until(
        has_transient(destination, "connection_failed"),
        "a failed Service Bus connection",
        describe=lambda: describe_deliveries([destination]),
    )
    delivered_while_down = delivered_count(destination)
    # The same port, key and queue: to the worker, the namespace came back.
    second = start_servicebus_peer(
        "127.0.0.1",
        first.port,
        session_queues=[entity],
        key_name=first.key_name,
        key=first.key,
    )
    own_servicebus_peers.append(second)
    publish_many(orders_app, Stage.TEST, after)
    wait_until_finished([destination])

    destination.refresh_from_db()
    received = read_servicebus_entity(first, entity) + read_servicebus_entity(
        second, entity
    )
    assert delivered_while_down < len(stream.envelopes)
    assert destination.paused_at is None
    assert all_delivered([destination]) == {}
    assert read_servicebus_entity(second, entity)
    assert_stream_delivered(received, stream)
