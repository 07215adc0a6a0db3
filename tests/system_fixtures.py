"""Fixtures and helpers for system tests: events published in this process, sent by
real Celery worker processes to the three local peers, and read back from the peers.

Tests that start their own worker (a short lease, another broker, another SQS
endpoint) stop the session's worker first, because every worker on the test database
claims every due delivery.
"""

import contextlib
import csv
import os
import signal
import socket
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.db.models import Count

from delivery.models import UNFINISHED, Attempt, Delivery, DeliveryStatus
from delivery.peers.pubsub import PubSubPeer, pull_messages
from delivery.peers.servicebus import ServiceBusPeer
from delivery.peers.sqs import free_port, sqs_client
from delivery.publishing import Envelope, parse_envelope
from destinations.models import Application, Destination, EntityType, Kind, Stage
from tests.conftest import PeerQueue, Worker, _failed
from tests.pubsub_fixtures import PUBSUB_PROJECT, PubSubTopic

FIXTURES = Path(__file__).parent / "fixtures"
STREAM = FIXTURES / "stream.jsonl"
STREAM_INDEX = FIXTURES / "stream_index.csv"
SAMPLE_EVENT = FIXTURES / "order_action_accept.json"
# The object key the project derives for the sample event.
SAMPLE_OBJECT_KEY = "4102/st-80231/order/FKO-2025-000001-A"
REGIONAL_ENDPOINT = "europe-west1-pubsub.googleapis.com:443"
REDIS_SERVER = Path("/usr/bin/redis-server")

WAIT_SECONDS = 90.0
POLL_SECONDS = 0.2


# Waiting.


def wait_until(
    condition: Callable[[], bool],
    what: str,
    timeout: float = WAIT_SECONDS,
    describe: Callable[[], str] = lambda: "",
) -> None:
    """Poll `condition` until it is true; fail with `what` and `describe()` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"Waited {timeout:g} s for {what}. {describe()}")
        time.sleep(POLL_SECONDS)


def status_counts(destinations: Iterable[Destination]) -> dict[str, dict[str, int]]:
    """Return, per destination name, how many deliveries are in each status."""
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    rows = (
        Delivery.objects.filter(destination__in=list(destinations))
        .values("destination__name", "status")
        .annotate(count=Count("pk"))
    )
    for row in rows:
        counts[row["destination__name"]][row["status"]] = row["count"]
    return dict(counts)


def describe_deliveries(destinations: Iterable[Destination]) -> str:
    destinations = list(destinations)
    paused = [
        f"{destination.name} paused: {destination.pause_reason}"
        for destination in Destination.objects.filter(
            pk__in=[d.pk for d in destinations], paused_at__isnull=False
        )
    ]
    recent = Attempt.objects.filter(delivery__destination__in=destinations).exclude(
        error_kind=""
    )[:5]
    errors = [f"{attempt.error_kind}: {attempt.message}" for attempt in recent]
    return (
        f"Deliveries by status: {status_counts(destinations)}. {paused}. Latest "
        f"errors: {errors}"
    )


def wait_until_finished(
    destinations: Iterable[Destination], timeout: float = WAIT_SECONDS
) -> None:
    """Wait until no delivery to `destinations` is pending, sending or held."""
    destinations = list(destinations)

    def finished() -> bool:
        unfinished = Delivery.objects.filter(
            destination__in=destinations, status__in=UNFINISHED
        )
        return not unfinished.exists()

    wait_until(
        finished,
        "every delivery to finish",
        timeout,
        lambda: describe_deliveries(destinations),
    )


def delivered_count(destination: Destination) -> int:
    return Delivery.objects.filter(
        destination=destination, status=DeliveryStatus.DELIVERED
    ).count()


# The event stream.


@dataclass(frozen=True)
class Stream:
    """Events of stream.jsonl with what stream_index.csv expects of each."""

    envelopes: list[Envelope]
    # The stream's text of each event, by event id: the bytes a partner receives.
    bodies: dict[str, bytes]
    # The object key of each event, by event id (the index's group_key).
    keys: dict[str, str]
    # The event ids of each object key, in the index's seq_in_group order.
    order: dict[str, list[str]]

    @property
    def ids(self) -> set[str]:
        return set(self.bodies)


def load_stream(limit: int | None = None) -> Stream:
    """Read the first `limit` events of the stream (all without a limit)."""
    lines = STREAM.read_text(encoding="utf-8").splitlines()[:limit]
    with STREAM_INDEX.open(encoding="utf-8", newline="") as index_file:
        rows = list(csv.DictReader(index_file))[: len(lines)]

    envelopes = [parse_envelope(line) for line in lines]
    bodies = {
        envelope.id: line.strip().encode()
        for envelope, line in zip(envelopes, lines, strict=True)
    }
    keys = {row["id"]: row["group_key"] for row in rows}
    positions: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for row in rows:
        positions[row["group_key"]].append((int(row["seq_in_group"]), row["id"]))
    order = {
        key: [event_id for _, event_id in sorted(numbered)]
        for key, numbered in positions.items()
    }
    return Stream(envelopes, bodies, keys, order)


# Messages read back from the peers.


@dataclass(frozen=True)
class Received:
    """One message as the peer stored it, reduced to what the ordering checks need."""

    event_id: str
    # MessageGroupId, ordering key or session id.
    key: str
    body: bytes
    # SQS FIFO only.
    deduplication_id: str = ""


def read_sqs_queue(queue: PeerQueue, timeout: float = WAIT_SECONDS) -> list[Received]:
    """Receive and delete every message of `queue`, in the order SQS returns them."""
    client = sqs_client(queue.endpoint_url)
    received: list[Received] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.receive_message(
            QueueUrl=queue.peer_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        messages = response.get("Messages", [])
        if not messages:
            return received
        for message in messages:
            attributes = message.get("Attributes", {})
            received.append(
                Received(
                    event_id=message["MessageAttributes"]["event_id"]["StringValue"],
                    key=attributes.get("MessageGroupId", ""),
                    body=message["Body"].encode(),
                    deduplication_id=attributes.get("MessageDeduplicationId", ""),
                )
            )
        client.delete_message_batch(
            QueueUrl=queue.peer_url,
            Entries=[
                {"Id": str(number), "ReceiptHandle": message["ReceiptHandle"]}
                for number, message in enumerate(messages)
            ],
        )
    pytest.fail(f"Queue {queue.name} still had messages after {timeout:g} s.")


def read_pubsub_topic(peer: PubSubPeer, topic: PubSubTopic) -> list[Received]:
    """Pull every message the peer accepted for `topic` through its subscription."""
    assert peer.state is not None
    count = len(peer.state.published(topic.path))
    messages = pull_messages(topic.endpoint, topic.subscription, count)
    return [
        Received(
            event_id=message.attributes["event_id"],
            key=message.ordering_key,
            body=bytes(message.data),
        )
        for message in messages
    ]


def read_servicebus_entity(peer: ServiceBusPeer, entity: str) -> list[Received]:
    """Return every message the peer accepted for `entity`, oldest first."""
    return [
        Received(
            event_id=str(message.application_properties["event_id"]),
            key=message.session_id or "",
            body=message.body,
        )
        for message in peer.messages(entity)
    ]


def collapse_repeats(event_ids: list[str]) -> list[str]:
    """Drop each id equal to the one before it: a message sent again because its
    worker died before recording it arrives right after the first copy."""
    collapsed: list[str] = []
    for event_id in event_ids:
        if not collapsed or collapsed[-1] != event_id:
            collapsed.append(event_id)
    return collapsed


def assert_stream_delivered(received: list[Received], stream: Stream) -> None:
    """Assert every event arrived, intact, under its object key, and in order per
    key; a repeat is allowed only right after the same event."""
    by_key: dict[str, list[str]] = defaultdict(list)
    for message in received:
        by_key[message.key].append(message.event_id)

    assert {message.event_id for message in received} == stream.ids
    wrong_bodies = [m.event_id for m in received if m.body != stream.bodies[m.event_id]]
    assert wrong_bodies == []
    wrong_keys = [m.event_id for m in received if m.key != stream.keys[m.event_id]]
    assert wrong_keys == []
    out_of_order = {
        key: event_ids
        for key, event_ids in by_key.items()
        if collapse_repeats(event_ids) != stream.order[key]
    }
    assert out_of_order == {}


# Destinations.


@pytest.fixture
def orders_app() -> Application:
    return Application.objects.create(
        name="Orders", slug=f"orders-{uuid.uuid4().hex[:8]}"
    )


def fast_retries(destination: Destination) -> Destination:
    """Retry after 0.5 to 1 s, then at most 2 s apart, so tests wait seconds."""
    destination.retry_initial_delay = 1
    destination.retry_max_delay = 2
    destination.save()
    return destination


def sqs_destination(application: Application, queue: PeerQueue) -> Destination:
    return fast_retries(
        Destination(
            application=application,
            stage=Stage.TEST,
            kind=Kind.SQS,
            name=f"queue {queue.name}",
            sqs_queue_url=queue.url,
            sqs_fifo=queue.fifo,
        )
    )


def pubsub_destination(
    application: Application, topic_id: str, *, ordering: bool = True
) -> Destination:
    return fast_retries(
        Destination(
            application=application,
            stage=Stage.TEST,
            kind=Kind.PUBSUB,
            name=f"topic {topic_id}",
            pubsub_project_id=PUBSUB_PROJECT,
            pubsub_topic_id=topic_id,
            pubsub_ordering=ordering,
            pubsub_endpoint=REGIONAL_ENDPOINT if ordering else "",
        )
    )


def servicebus_destination(
    application: Application,
    connection_string: str,
    entity: str,
    *,
    entity_type: str = EntityType.QUEUE,
    sessions: bool = True,
    partitioning: bool = True,
) -> Destination:
    destination = Destination(
        application=application,
        stage=Stage.TEST,
        kind=Kind.SERVICEBUS,
        name=f"{entity_type} {entity}",
        servicebus_entity_type=entity_type,
        servicebus_entity_name=entity,
        servicebus_sessions=sessions,
        servicebus_partitioning=partitioning,
    )
    destination.set_connection_string(connection_string)
    return fast_retries(destination)


# Worker processes of a test's own.


@pytest.fixture(scope="module")
def session_worker_stopped(celery_worker: Worker) -> Iterator[None]:
    """Stop the session's worker for this module's tests and start it again after,
    so that the workers these tests start are the only ones sending."""
    celery_worker.stop()
    yield
    celery_worker.restart()


@dataclass
class WorkerFactory:
    """Starts worker processes like the session's, with changed settings."""

    base: Worker
    folder: Path
    started: list[Worker] = field(default_factory=list)

    def start(self, name: str, **environment: str) -> Worker:
        """Start a worker named `name` with `environment` over the session worker's
        variables, and wait until it consumes from its broker."""
        command = list(self.base.command)
        command[command.index("-n") + 1] = f"{name}-{uuid.uuid4().hex[:6]}@127.0.0.1"
        schedule = self.folder / f"{name}-{len(self.started)}-schedule"
        command[command.index("--schedule") + 1] = str(schedule)
        log = self.folder / f"{name}-{len(self.started)}.log"
        worker = Worker(command, {**self.base.environment, **environment}, log)
        self.started.append(worker)
        worker.wait_until_ready(60.0)
        return worker

    def logs(self) -> str:
        return "\n".join(
            f"--- {worker.log_path.name}:\n{worker.log()}" for worker in self.started
        )

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


@pytest.fixture
def start_worker(
    session_worker_stopped: None,
    celery_worker: Worker,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., Worker]]:
    """Return a function that starts a worker process for this test.

    Every worker it started is stopped after the test. If the test failed, their
    logs are printed.
    """
    factory = WorkerFactory(celery_worker, tmp_path)
    try:
        yield factory.start
    finally:
        factory.stop_all()
        if _failed(request.node):
            print(factory.logs())


def kill(worker: Worker) -> None:
    """End `worker` and its child processes with SIGKILL, as the out-of-memory
    killer ends a container.

    `celery worker --beat` runs beat in a child process, which outlives a killed
    worker and keeps queueing sweeps unless it is killed too.
    """
    children = child_pids(worker.process.pid)
    worker.process.kill()
    worker.process.wait()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def child_pids(pid: int) -> list[int]:
    """Return the ids of the child processes of process `pid` (Linux /proc)."""
    children: list[int] = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        children += [int(child) for child in listing.read_text().split()]
    return children


def sqs_environment(endpoint_url: str) -> dict[str, str]:
    """Return the variables that send a worker's SQS calls to `endpoint_url`."""
    return {
        "TEST_SQS_ENDPOINT_URL": endpoint_url,
        "PROD_SQS_ENDPOINT_URL": endpoint_url,
        "AWS_ENDPOINT_URL_SQS": endpoint_url,
    }


# Servers a test stops and starts again.


class SqsServerOnPort:
    """A moto server on a fixed port that is started and stopped at will.

    moto keeps its queues in module globals, so this server and the session's SQS peer,
    both in this process, serve the same queues: a queue made on the peer outlives
    this server's restarts.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._server: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(
            ip_address="127.0.0.1", port=self.port, verbose=False
        )
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture
def sqs_server_on_port() -> Iterator[SqsServerOnPort]:
    """A moto server on a free port, not started yet; stopped after the test."""
    server = SqsServerOnPort(free_port("127.0.0.1"))
    yield server
    server.stop()


class RedisServer:
    """A private redis-server on 127.0.0.1 with nothing saved to disk."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(REDIS_SERVER),
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_path.parent,
            )
        wait_until(self.answers_ping, f"redis-server on port {self.port}", timeout)

    def answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server with SIGTERM, as a service manager does."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server on a free port, started; stopped after the test."""
    server = RedisServer(free_port("127.0.0.1"), tmp_path / "redis.log")
    server.start()
    yield server
    server.stop()
