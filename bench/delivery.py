"""The delivery benchmark: each destination kind's raw client against the pipeline.

    .venv/bin/python -m bench.delivery [--events 2000] [--kinds sqs,pubsub,servicebus]
        [--rate 50] [--seconds 20] [--workers 2] [--batch-size 100] [--repeat 5]
        [--history 100000] [--worker-settings portal.settings]

For each kind (an SQS FIFO queue on moto's server, a Pub/Sub topic with message
ordering on the project's gRPC peer, a Service Bus session queue on the project's AMQP
peer) it measures:

- throughput: the events per second of the kind's client library sending N events in
  a tight loop, and of the pipeline, where `publish_many` records N events and a
  `celery worker` sends them. The target is pipeline / raw >= 0.8. The client library
  also sends N events in the shape the engine gives an ordered destination's
  transport (one event per ordering key per call), which separates the cost of that
  shape from the engine's own. Raw and pipeline runs take turns, --repeat times,
  because one run's rate can vary by half on a shared machine. The ratio is the
  median of each pair's ratio: a raw run and the pipeline run right after it see
  the same conditions.
- latency at a steady rate: the time from the commit of one event to its arrival at
  the peer, beside the client library sending one message at a time and waiting for
  the acknowledgement. The target is pipeline p50 <= raw p50 + 15 ms.

It drops and recreates the PostgreSQL database bench_portal, flushes Redis database 9,
and starts the peers and the worker itself, all on 127.0.0.1. It records --history
delivered events first, so that PostgreSQL plans with the statistics of a database in
use, and runs VACUUM ANALYZE before each kind and each pair of runs, in case the server
runs without autovacuum. It prints two tables and writes every figure to
var/bench/delivery-<timestamp>.json. docs/benchmarks.md explains each number and
records a run.
"""

import argparse
import contextlib
import importlib.metadata
import itertools
import json
import multiprocessing
import os
import platform
import queue
import re
import select
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol

import psycopg
import redis
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from cryptography.fernet import Fernet
from google.api_core.exceptions import DeadlineExceeded

# Only modules that work before Django is set up are imported here, because this
# program recreates the database and sets the environment first. Models and
# publishing are imported inside the functions that use them.
from delivery.object_keys import object_key
from delivery.peers.pubsub import (
    PubSubPeer,
    create_subscription,
    create_topic,
    publisher_client,
    start_pubsub_peer,
    stop_process,
    subscriber_client,
)
from delivery.peers.pubsub import peer_environment as pubsub_environment
from delivery.peers.sqs import (
    SqsPeer,
    aws_queue_url,
    create_queue,
    sqs_client,
    start_sqs_peer,
)
from delivery.peers.sqs import peer_environment as sqs_environment

BASE_DIR = Path(__file__).resolve().parent.parent
OUTPUT_DIR = BASE_DIR / "var" / "bench"
SAMPLE_EVENT = BASE_DIR / "tests" / "fixtures" / "order_action_accept.json"

HOST = "127.0.0.1"
SERVER_URL = f"postgres://postgres@{HOST}:5432"
DATABASE_NAME = "bench_portal"
DATABASE_URL = f"{SERVER_URL}/{DATABASE_NAME}"
BROKER_URL = f"redis://{HOST}:6379/9"

KINDS = ("sqs", "pubsub", "servicebus")
KIND_LABELS = {
    "sqs": "SQS FIFO (moto)",
    "pubsub": "Pub/Sub ordered",
    "servicebus": "Service Bus sessions",
}
RAW_THROUGHPUT = "raw-tp"
# The raw client sending one event per ordering key per call, as the delivery
# engine's transport calls get them for an ordered destination.
RAW_PER_KEY = "raw-key"
PIPELINE_THROUGHPUT = "pipe-tp"
RAW_LATENCY = "raw-lat"
PIPELINE_LATENCY = "pipe-lat"
PHASES = (
    RAW_THROUGHPUT,
    RAW_PER_KEY,
    PIPELINE_THROUGHPUT,
    RAW_LATENCY,
    PIPELINE_LATENCY,
)
# The parts of a phase's event ids.
MEASURED = "m"
WARM_UP = "w"

# Events are spread over this many orders, so ordered destinations see this many
# ordering keys (MessageGroupId, ordering key, session id).
OBJECT_KEYS = 100
# Sent before each measurement, so that connections, links and clients exist in the
# sending process, as they do in a long-running worker.
WARM_UP_EVENTS = 20
WARM_UP_RATE = 20.0
# SendMessageBatch takes at most 10 entries (SQS API reference).
SQS_BATCH_ENTRIES = 10
# Messages per ServiceBusMessageBatch in the raw loop, as many as the Pub/Sub client
# puts in one batch by default.
SERVICEBUS_BATCH_MESSAGES = 100
PUBSUB_PROJECT = "bench-project"
# Ordering needs a regional endpoint on the destination; the worker's emulator host
# setting sends every publish to the local peer instead.
PUBSUB_REGIONAL_ENDPOINT = "europe-west1-pubsub.googleapis.com:443"

THROUGHPUT_TARGET = 0.8
LATENCY_TARGET_MS = 15.0
POLL_SECONDS = 0.05
START_SECONDS = 60.0
# The slowest pipeline this benchmark waits for, in events per second.
SLOWEST_RATE = 5.0

# AWS variables of the caller's shell that could steer a client away from the peer.
AWS_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


class BenchError(RuntimeError):
    """A benchmark step that could not run; its message names the step and the
    cause."""


# Options.


@dataclass(frozen=True)
class Options:
    events: int
    kinds: tuple[str, ...]
    rate: float
    seconds: float
    workers: int
    batch_size: int
    worker_settings: str
    repeat: int = 5
    history: int = 100_000


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.delivery",
        description=(
            "Measure delivery throughput and latency per destination kind against "
            "each kind's raw client library, on local peers, PostgreSQL and Redis."
        ),
    )
    parser.add_argument(
        "--events",
        type=int,
        default=2000,
        help="Events per throughput run, raw and pipeline (default: 2000).",
    )
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"Comma-separated kinds to measure (default: {','.join(KINDS)}).",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=50.0,
        help="Events per second in the latency runs (default: 50).",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=20.0,
        help="Length of each latency run, in seconds (default: 20).",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="Worker processes: the worker's --concurrency (default: 2).",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="Events per publish_many commit in the throughput runs (default: 100).",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=5,
        help=(
            "Throughput runs per kind, raw and pipeline taking turns; the tables "
            "show the median run of each and the median ratio of the pairs "
            "(default: 5)."
        ),
    )
    parser.add_argument(
        "--history",
        type=int,
        default=100_000,
        help=(
            "Delivered events recorded before measuring, as a database in use "
            "contains them, so that PostgreSQL plans with the statistics of one; 0 "
            "starts on empty tables (default: 100000)."
        ),
    )
    parser.add_argument(
        "--worker-settings",
        default="portal.settings",
        help=(
            "The worker's Django settings module, to measure a settings change "
            "without editing portal/settings.py (default: portal.settings)."
        ),
    )
    arguments = parser.parse_args(argv)

    kinds = tuple(kind.strip() for kind in arguments.kinds.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        parser.error(
            f"--kinds {arguments.kinds!r} names no kind or an unknown one "
            f"({', '.join(unknown) or 'empty'}). Choose from {', '.join(KINDS)}."
        )
    for name in ("events", "workers", "batch_size", "repeat"):
        if getattr(arguments, name) < 1:
            option = "--" + name.replace("_", "-")
            value = getattr(arguments, name)
            parser.error(f"{option} is {value}; it must be 1 or more.")
    for name in ("rate", "seconds"):
        value = getattr(arguments, name)
        if value <= 0:
            parser.error(f"--{name} is {value}; it must be more than 0.")
    if arguments.history < 0:
        parser.error(f"--history is {arguments.history}; it must be 0 or more.")
    return Options(
        events=arguments.events,
        kinds=kinds,
        rate=arguments.rate,
        seconds=arguments.seconds,
        workers=arguments.workers,
        batch_size=arguments.batch_size,
        worker_settings=arguments.worker_settings,
        repeat=arguments.repeat,
        history=arguments.history,
    )


# Sample events.


@dataclass(frozen=True)
class Message:
    """One sample event, as the raw clients and publish_many both get it."""

    event_id: str
    event_type: str
    object_key: str
    # The envelope's JSON text: the message body, byte for byte.
    text: str

    @property
    def body(self) -> bytes:
        return self.text.encode()


def event_prefix(run_id: str, kind: str, phase: str, part: str) -> str:
    """Return the start of the event ids of one part of one phase, so that the
    database can select them with a prefix match."""
    return f"{run_id}-{kind}-{phase}-{part}-"


def make_messages(prefix: str, count: int) -> list[Message]:
    """Return `count` copies of the sample order event with unique ids, spread over
    OBJECT_KEYS orders, with event times that increase in list order."""
    sample = json.loads(SAMPLE_EVENT.read_text(encoding="utf-8"))
    start = datetime.now(UTC)
    messages = []
    for index in range(count):
        envelope = json.loads(json.dumps(sample))
        envelope["id"] = f"{prefix}{index:07d}"
        event_time = start + timedelta(milliseconds=index)
        envelope["time"] = event_time.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        envelope["data"]["channel_order_id"] = f"FKO-2025-{index % OBJECT_KEYS:06d}-A"
        text = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)
        key = object_key(envelope["type"], envelope["data"], envelope["id"])
        messages.append(Message(envelope["id"], envelope["type"], key, text))
    return messages


def chunks[T](items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# Statistics.


def percentile(values: Sequence[float], share: float) -> float:
    """Return the nearest-rank percentile `share` (0 to 100) of `values`."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * share // 100))
    return ordered[int(rank) - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Return p50, p99 and max of latencies given in seconds, in milliseconds."""
    if not seconds:
        return {}
    return {
        "count": len(seconds),
        "p50": round(percentile(seconds, 50) * 1000, 1),
        "p99": round(percentile(seconds, 99) * 1000, 1),
        "max": round(max(seconds) * 1000, 1),
    }


# Peers.


@dataclass
class ServiceBusProcess:
    """The Service Bus peer, run as `python -m delivery.peers.servicebus` so that
    its event loop has its own interpreter lock."""

    process: subprocess.Popen[bytes]
    log_path: Path
    connection_string: str = field(repr=False)
    _log: IO[bytes] = field(repr=False)

    def accepted(self, entity: str) -> int:
        """Return how many messages the peer accepted for `entity`, from its log."""
        pattern = re.compile(
            rf"accepted (\d+) message\(s\) for {re.escape(entity)} in", re.IGNORECASE
        )
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return sum(int(match.group(1)) for match in pattern.finditer(text))

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


def start_servicebus_process(entities: list[str], log_path: Path) -> ServiceBusProcess:
    command = [sys.executable, "-m", "delivery.peers.servicebus", "--host", HOST]
    command += ["--port", "0"]
    for entity in entities:
        command += ["--session-queue", entity]
    log = log_path.open("wb")
    process = subprocess.Popen(
        command, cwd=BASE_DIR, stdout=subprocess.PIPE, stderr=log
    )
    assert process.stdout is not None
    # The peer prints its connection string once it listens.
    readable, _, _ = select.select([process.stdout], [], [], START_SECONDS)
    line = process.stdout.readline().decode().strip() if readable else ""
    if not line.startswith("Endpoint="):
        process.kill()
        process.wait()
        log.close()
        raise BenchError(
            f"The Service Bus peer did not start within {START_SECONDS:g} s. Its "
            f"log is {log_path}."
        )
    return ServiceBusProcess(process, log_path, line, log)


@dataclass
class Peers:
    sqs: SqsPeer
    pubsub: PubSubPeer
    servicebus: ServiceBusProcess

    def environment(self) -> dict[str, str]:
        """Environment variables that send both stages' calls to these peers."""
        return {
            **sqs_environment(self.sqs.endpoint_url),
            **pubsub_environment(self.pubsub.endpoint),
        }

    def pid(self, kind: str) -> int | None:
        """Return the process id of `kind`'s peer, None if it runs in this one."""
        if kind == "servicebus":
            return self.servicebus.process.pid
        process = self.sqs._process if kind == "sqs" else self.pubsub._process
        return process.pid if process is not None else None

    def stop(self) -> None:
        for stop in (self.servicebus.stop, self.pubsub.stop, self.sqs.stop):
            with contextlib.suppress(Exception):
                stop()


def start_peers(servicebus_entities: list[str], stamp: str) -> Peers:
    """Start the three peers as child processes, so that none of them shares this
    process's interpreter lock with the clients being measured."""
    sqs = start_sqs_peer(HOST, 0, in_process=False)
    try:
        pubsub = start_pubsub_peer(HOST, 0, in_process=False)
    except Exception:
        sqs.stop()
        raise
    try:
        servicebus = start_servicebus_process(
            servicebus_entities, OUTPUT_DIR / f"servicebus-peer-{stamp}.log"
        )
    except Exception:
        pubsub.stop()
        sqs.stop()
        raise
    return Peers(sqs, pubsub, servicebus)


# Targets: one queue, topic or entity per kind and phase, fresh for each run.


@dataclass
class Target:
    kind: str
    phase: str
    name: str
    # SQS: the queue URL the peer reports. Pub/Sub: the full topic name. Service
    # Bus: the entity name.
    address: str = ""
    # Pub/Sub: the subscription the reader pulls from.
    subscription: str = ""
    destination_id: int = 0
    application_id: int = 0


def target_name(phase: str, run_id: str) -> str:
    return f"bench-{phase}-{run_id}"


def create_targets(
    kinds: Sequence[str], run_id: str, peers: Peers
) -> dict[tuple[str, str], Target]:
    """Create a fresh queue, topic or entity per kind and phase on the peers.

    Fresh queues matter for moto, whose sends slow down as a queue fills.
    """
    targets = {}
    for kind in kinds:
        for phase in PHASES:
            name = target_name(phase, run_id)
            target = Target(kind, phase, name)
            if kind == "sqs":
                target.name = f"{name}.fifo"
                target.address = create_queue(peers.sqs.endpoint_url, target.name)
            elif kind == "pubsub":
                endpoint = peers.pubsub.endpoint
                target.address = create_topic(endpoint, PUBSUB_PROJECT, name)
                # Without message ordering, so that the peer never delays a message
                # behind one the reader has not acknowledged yet.
                target.subscription = create_subscription(
                    endpoint, target.address, f"{name}-reader"
                )
            else:
                target.address = name
            targets[kind, phase] = target
    return targets


def create_destination(target: Target, peers: Peers) -> None:
    """Save an application with one TEST destination that sends to `target`."""
    from destinations.models import Application, Destination, EntityType, Kind, Stage

    application = Application.objects.create(
        name=f"Bench {target.kind} {target.phase}",
        slug=f"bench-{target.kind}-{target.phase}",
    )
    destination = Destination(
        application=application,
        stage=Stage.TEST,
        name=f"{target.kind} {target.name}",
    )
    if target.kind == "sqs":
        destination.kind = Kind.SQS
        destination.sqs_queue_url = aws_queue_url(target.name)
        destination.sqs_fifo = True
    elif target.kind == "pubsub":
        destination.kind = Kind.PUBSUB
        destination.pubsub_project_id = PUBSUB_PROJECT
        destination.pubsub_topic_id = target.name
        destination.pubsub_ordering = True
        destination.pubsub_endpoint = PUBSUB_REGIONAL_ENDPOINT
    else:
        destination.kind = Kind.SERVICEBUS
        destination.servicebus_entity_type = EntityType.QUEUE
        destination.servicebus_entity_name = target.name
        destination.servicebus_sessions = True
        destination.set_connection_string(peers.servicebus.connection_string)
    destination.save()
    target.destination_id = destination.pk
    target.application_id = application.pk


# Readers: child processes that empty a queue or subscription and keep the arrival
# time the peer stamped on each message.


def _read_sqs(
    endpoint: str,
    queue_url: str,
    ready: EventType,
    stop: EventType,
    results: "multiprocessing.Queue[dict[str, float]]",
) -> None:
    """Receive and delete until stopped and empty; put {event id: SentTimestamp}.

    Deleting as messages arrive keeps the queue short, which keeps moto's sends
    fast for the sender being measured.
    """
    client = sqs_client(endpoint)
    arrivals: dict[str, float] = {}
    ready.set()
    while True:
        stopping = stop.is_set()
        response = client.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0 if stopping else 1,
            VisibilityTimeout=300,
            AttributeNames=["SentTimestamp"],
            MessageAttributeNames=["event_id"],
        )
        messages = response.get("Messages", [])
        if not messages and stopping:
            break
        for message in messages:
            event_id = message["MessageAttributes"]["event_id"]["StringValue"]
            # moto stamps SentTimestamp in whole milliseconds when it stores the
            # message.
            arrivals[event_id] = int(message["Attributes"]["SentTimestamp"]) / 1000
        if messages:
            client.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[
                    {"Id": str(position), "ReceiptHandle": message["ReceiptHandle"]}
                    for position, message in enumerate(messages)
                ],
            )
    results.put(arrivals)


def _read_pubsub(
    endpoint: str,
    subscription: str,
    ready: EventType,
    stop: EventType,
    results: "multiprocessing.Queue[dict[str, float]]",
) -> None:
    """Pull and acknowledge until stopped and empty; put {event id: publish_time}."""
    arrivals: dict[str, float] = {}
    with subscriber_client(endpoint) as subscriber:
        ready.set()
        while True:
            stopping = stop.is_set()
            try:
                response = subscriber.pull(
                    subscription=subscription, max_messages=1000, retry=None, timeout=5
                )
                received = list(response.received_messages)
            except DeadlineExceeded:
                received = []
            if not received and stopping:
                break
            for item in received:
                # The peer sets publish_time when it stores the message.
                event_id = item.message.attributes["event_id"]
                arrivals[event_id] = item.message.publish_time.timestamp()
            if received:
                subscriber.acknowledge(
                    subscription=subscription,
                    ack_ids=[item.ack_id for item in received],
                )
    results.put(arrivals)


class Reader:
    """A reader child process; `collect()` stops it and returns its arrivals."""

    # Readers not yet collected, which must end before the peers stop.
    running: ClassVar[list["Reader"]] = []

    def __init__(self, function: Callable[..., None], *arguments: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.ready = context.Event()
        self.stop = context.Event()
        self.results: multiprocessing.Queue[dict[str, float]] = context.Queue()
        self.process = context.Process(
            target=function,
            args=(*arguments, self.ready, self.stop, self.results),
            daemon=True,
        )
        self.process.start()
        Reader.running.append(self)
        if not self.ready.wait(START_SECONDS):
            self.process.kill()
            raise BenchError(f"A reader did not start within {START_SECONDS:g} s.")

    def collect(self, timeout: float = 120.0) -> dict[str, float]:
        self.stop.set()
        try:
            arrivals = self.results.get(timeout=timeout)
        except queue.Empty as error:
            raise BenchError(
                f"A reader returned no arrivals within {timeout:g} s (exit status "
                f"{self.process.exitcode})."
            ) from error
        self.process.join(10)
        Reader.running.remove(self)
        return arrivals

    @classmethod
    def kill_all(cls) -> None:
        for reader in cls.running:
            reader.process.kill()
            reader.process.join(10)
        cls.running.clear()


def start_reader(target: Target, peers: Peers) -> Reader | None:
    """Start the reader of `target`, or return None for Service Bus, whose peer
    records no receipt time that another process can read."""
    if target.kind == "sqs":
        return Reader(_read_sqs, peers.sqs.endpoint_url, target.address)
    if target.kind == "pubsub":
        return Reader(_read_pubsub, peers.pubsub.endpoint, target.subscription)
    return None


# Raw clients: the kind's client library alone, against the same peer.


class RawClient(Protocol):
    def send_all(self, messages: Sequence[Message]) -> None:
        """Send every message, batched as the library allows; return when all are
        acknowledged."""

    def send_one(self, message: Message) -> None:
        """Send one message and return when it is acknowledged."""

    def send_call(self, messages: Sequence[Message]) -> None:
        """Send messages as the project's transport sends the messages of one
        call, and return when all are acknowledged."""

    def close(self) -> None: ...


class RawSqs:
    """boto3: SendMessageBatch of 10 for throughput, SendMessage for latency."""

    def __init__(self, endpoint_url: str, queue_url: str) -> None:
        self.client = sqs_client(endpoint_url)
        self.queue_url = queue_url

    @staticmethod
    def entry(message: Message) -> dict[str, Any]:
        # The same fields the SQS transport sends.
        return {
            "MessageBody": message.text,
            "MessageAttributes": {
                "event_id": {"DataType": "String", "StringValue": message.event_id},
                "event_type": {"DataType": "String", "StringValue": message.event_type},
            },
            "MessageGroupId": message.object_key,
            "MessageDeduplicationId": message.event_id,
        }

    def send_all(self, messages: Sequence[Message]) -> None:
        for batch in chunks(messages, SQS_BATCH_ENTRIES):
            entries = [
                {"Id": str(position), **self.entry(message)}
                for position, message in enumerate(batch)
            ]
            response = self.client.send_message_batch(
                QueueUrl=self.queue_url, Entries=entries
            )
            if response.get("Failed"):
                failed = response["Failed"][0]
                raise BenchError(
                    f"SendMessageBatch to {self.queue_url} failed for entry "
                    f"{failed.get('Id')}: {failed.get('Code')} {failed.get('Message')}"
                )

    def send_one(self, message: Message) -> None:
        self.client.send_message(QueueUrl=self.queue_url, **self.entry(message))

    def send_call(self, messages: Sequence[Message]) -> None:
        # The transport batches a call's messages 10 at a time, whatever their
        # MessageGroupId.
        self.send_all(messages)

    def close(self) -> None:
        self.client.close()


class RawPubSub:
    """google-cloud-pubsub: a PublisherClient with message ordering and its default
    batch settings."""

    def __init__(self, endpoint: str, topic: str) -> None:
        self.client = publisher_client(endpoint, ordering=True)
        self.topic = topic

    def publish(self, message: Message) -> Any:
        return self.client.publish(
            self.topic,
            message.body,
            ordering_key=message.object_key,
            event_id=message.event_id,
            event_type=message.event_type,
        )

    def send_all(self, messages: Sequence[Message]) -> None:
        futures = [self.publish(message) for message in messages]
        for future in futures:
            future.result(timeout=120)

    def send_one(self, message: Message) -> None:
        self.publish(message).result(timeout=30)

    def send_call(self, messages: Sequence[Message]) -> None:
        # The transport publishes a call's messages, then waits for all of them.
        self.send_all(messages)

    def close(self) -> None:
        self.client.stop()
        self.client.transport.close()


class RawServiceBus:
    """azure-servicebus: ServiceBusMessageBatch for throughput, one message at a
    time for latency, with a session id per order."""

    def __init__(self, connection_string: str, queue: str) -> None:
        self.client = ServiceBusClient.from_connection_string(connection_string)
        self.sender = self.client.get_queue_sender(queue_name=queue)

    @staticmethod
    def message(message: Message) -> Any:
        # The same fields the Service Bus transport sends.
        return ServiceBusMessage(
            message.body,
            message_id=message.event_id,
            content_type="application/json",
            application_properties={
                "event_type": message.event_type,
                "event_id": message.event_id,
            },
            session_id=message.object_key,
        )

    def send_all(self, messages: Sequence[Message]) -> None:
        for chunk in chunks(messages, SERVICEBUS_BATCH_MESSAGES):
            batch = self.sender.create_message_batch()
            for message in chunk:
                batch.add_message(self.message(message))
            self.sender.send_messages(batch)

    def send_one(self, message: Message) -> None:
        self.sender.send_messages(self.message(message))

    def send_call(self, messages: Sequence[Message]) -> None:
        # One batch per session id, as a partitioned entity requires: the shape of
        # an engine that sends each key's oldest event alone.
        for _, run in itertools.groupby(messages, key=lambda m: m.object_key):
            same_session = list(run)
            if len(same_session) == 1:
                self.send_one(same_session[0])
            else:
                self.send_all(same_session)

    def close(self) -> None:
        self.sender.close()
        self.client.close()


def raw_client(target: Target, peers: Peers) -> RawClient:
    if target.kind == "sqs":
        return RawSqs(peers.sqs.endpoint_url, target.address)
    if target.kind == "pubsub":
        return RawPubSub(peers.pubsub.endpoint, target.address)
    return RawServiceBus(peers.servicebus.connection_string, target.address)


# The worker.


class Worker:
    """A `celery worker` process with --beat, as the project runs it."""

    def __init__(self, concurrency: int, environment: dict[str, str], stamp: str):
        self.log_path = OUTPUT_DIR / f"worker-{stamp}.log"
        self._log = self.log_path.open("wb")
        command = [str(Path(sys.executable).parent / "celery"), "-A", "portal"]
        command += ["worker", "--concurrency", str(concurrency), "-l", "INFO"]
        self.node_name = f"bench-{os.getpid()}@{HOST}"
        command += ["-n", self.node_name]
        # --beat runs the periodic sweep inside this worker.
        command += ["--beat", "--schedule", str(OUTPUT_DIR / f"beat-{stamp}")]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        self.process = subprocess.Popen(
            command,
            cwd=BASE_DIR,
            env=environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        # Celery logs "celery@HOST ready." once it consumes from the broker.
        while " ready." not in self.log():
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"The Celery worker was not ready after {START_SECONDS:g} s. Its "
                    f"log is {self.log_path}."
                )
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """Return the CPU time, user and system, that the worker's processes (the
        main process, its pool and beat) have used so far."""
        return sum(cpu_seconds(pid) for pid in process_tree(self.process.pid))

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"The Celery worker exited with status {self.process.returncode}. "
                f"Its log is {self.log_path}."
            )

    def stop(self) -> None:
        children = process_tree(self.process.pid)[1:]
        # SIGTERM is Celery's warm shutdown: it finishes the tasks in hand first.
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # In 2 of 18 runs, the embedded beat process (Celery 5.7) outlived the warm
        # shutdown and went on queueing sweeps. A leftover process is killed only
        # if its command line names this worker, in case its id was reused.
        for pid in children:
            with contextlib.suppress(OSError):
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
                if self.node_name.encode() in command:
                    os.kill(pid, signal.SIGKILL)
        self._log.close()


def process_tree(pid: int) -> list[int]:
    """Return `pid` and its living descendants, from /proc."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            for child in (task / "children").read_text().split():
                pids += process_tree(int(child))
    return pids


def cpu_seconds(pid: int) -> float:
    """Return the user and system CPU time of process `pid`, or 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The fields after the command name in brackets, from field 3 (state) on:
    # utime and stime are fields 14 and 15, in clock ticks (proc(5)).
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """Return the CPU time of all PostgreSQL server processes on this machine, the
    benchmark's connections among them."""
    total = 0.0
    for path in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if path.joinpath("comm").read_text().strip() == "postgres":
                total += cpu_seconds(int(path.name))
    return total


class CpuMeter:
    """The CPU time that the peer of one kind and PostgreSQL spend during a run."""

    def __init__(self, peers: Peers, kind: str) -> None:
        self.peer_pid = peers.pid(kind)
        self.peer_start = self._peer()
        self.postgres_start = postgres_cpu_seconds()

    def _peer(self) -> float:
        return cpu_seconds(self.peer_pid) if self.peer_pid is not None else 0.0

    def per_event(self, events: int) -> dict[str, float]:
        """Return the CPU milliseconds per event since the meter started."""
        figures = {
            "postgres_cpu_ms_per_event": per_event_ms(
                postgres_cpu_seconds() - self.postgres_start, events
            )
        }
        if self.peer_pid is not None:
            figures["peer_cpu_ms_per_event"] = per_event_ms(
                self._peer() - self.peer_start, events
            )
        return figures


def worker_environment(
    peers: Peers, encryption_key: str, settings_module: str
) -> dict[str, str]:
    environment = {
        name: value for name, value in os.environ.items() if name not in AWS_VARIABLES
    }
    environment.update(
        {
            "DJANGO_SETTINGS_MODULE": settings_module,
            "ENV_FILE": "",
            "DATABASE_URL": DATABASE_URL,
            "CELERY_BROKER_URL": BROKER_URL,
            "ENCRYPTION_KEYS": encryption_key,
            # The project's default level: one line per delivery.
            "LOG_LEVEL": "INFO",
            **peers.environment(),
        }
    )
    return environment


# The pipeline: publish_many in this process, the worker sends.


def publish_batch(
    application: Any, envelopes: Sequence[Any], on_commit: Callable[[], None]
) -> None:
    """Record `envelopes` in one transaction; `on_commit` runs right after the
    commit, before publish_many's own callback wakes the workers."""
    from django.db import transaction

    from delivery.publishing import publish_many
    from destinations.models import Stage

    with transaction.atomic():
        transaction.on_commit(on_commit)
        publish_many(application, Stage.TEST, envelopes)


def publish_paced(
    application: Any, envelopes: Sequence[Any], rate: float
) -> dict[str, float]:
    """Publish one event per commit at `rate` per second, on a fixed schedule;
    return each event's commit time."""
    commits: dict[str, float] = {}
    start = time.time() + 0.1
    for index, envelope in enumerate(envelopes):
        pause = start + index / rate - time.time()
        if pause > 0:
            time.sleep(pause)

        def stamp(event_id: str = envelope.id) -> None:
            commits[event_id] = time.time()

        publish_batch(application, [envelope], stamp)
    return commits


def wait_delivered(target: Target, prefix: str, expected: int, worker: Worker) -> None:
    """Poll the database until `expected` deliveries of events starting with
    `prefix` are delivered; raise BenchError if one fails or time runs out."""
    from delivery.models import Attempt, Delivery, DeliveryStatus

    deliveries = Delivery.objects.filter(
        destination_id=target.destination_id, event__id__startswith=prefix
    )
    timeout = 60 + expected / SLOWEST_RATE
    deadline = time.monotonic() + timeout
    while True:
        delivered = deliveries.filter(status=DeliveryStatus.DELIVERED).count()
        if delivered >= expected:
            return
        failed = deliveries.filter(status=DeliveryStatus.FAILED).exists()
        if failed or time.monotonic() > deadline:
            # Attempts are ordered newest first.
            attempt = (
                Attempt.objects.filter(delivery__in=deliveries)
                .exclude(error_kind="")
                .first()
            )
            error = f"{attempt.error_kind}: {attempt.message}" if attempt else "none"
            outcome = "one failed" if failed else f"{timeout:g} s passed"
            raise BenchError(
                f"{delivered} of {expected} {target.kind} deliveries were delivered "
                f"when {outcome}. The latest error: {error} The worker's log is "
                f"{worker.log_path}."
            )
        worker.check_alive()
        time.sleep(POLL_SECONDS)


def attempt_times(target: Target, prefix: str) -> dict[str, tuple[float, float]]:
    """Return, per event, when the worker started the transport call that sent it
    and when that call returned, from the successful attempt's start and
    duration."""
    from delivery.models import Attempt, Outcome

    rows = Attempt.objects.filter(
        delivery__destination_id=target.destination_id,
        delivery__event__id__startswith=prefix,
        outcome=Outcome.SUCCESS,
    ).values_list("delivery__event_id", "started_at", "duration_ms")
    return {
        event_id: (started_at.timestamp(), started_at.timestamp() + duration / 1000)
        for event_id, started_at, duration in rows
    }


def attempt_ends(target: Target, prefix: str) -> dict[str, float]:
    """Return, per event, when its successful attempt's send returned."""
    times = attempt_times(target, prefix)
    return {event_id: end for event_id, (_, end) in times.items()}


def send_timeline(target: Target, prefix: str) -> dict[str, float]:
    """Summarise the worker's transport calls in the run, from its attempt rows.

    One transport call records one started_at for all its deliveries, so the rows
    group into calls. Time between one call's end and the next call's start is
    spent outside the transport: claiming, recording, and waiting for a task.
    """
    from django.db.models import Count

    from delivery.models import Attempt, Outcome

    calls = list(
        Attempt.objects.filter(
            delivery__destination_id=target.destination_id,
            delivery__event__id__startswith=prefix,
            outcome=Outcome.SUCCESS,
        )
        .values("started_at", "duration_ms")
        .annotate(messages=Count("pk"))
        .order_by("started_at")
    )
    if not calls:
        return {}
    send_seconds = sum(call["duration_ms"] for call in calls) / 1000
    gaps = []
    for previous, following in itertools.pairwise(calls):
        previous_end = previous["started_at"] + timedelta(
            milliseconds=previous["duration_ms"]
        )
        gaps.append((following["started_at"] - previous_end).total_seconds())
    first = calls[0]["started_at"]
    last = calls[-1]["started_at"] + timedelta(milliseconds=calls[-1]["duration_ms"])
    return {
        "transport_calls": len(calls),
        "messages_per_call": round(sum(c["messages"] for c in calls) / len(calls), 1),
        "send_seconds": round(send_seconds, 3),
        "first_to_last_call_seconds": round((last - first).total_seconds(), 3),
        "mean_ms_per_call": round(send_seconds * 1000 / len(calls), 1),
        "mean_gap_ms_between_calls": round(
            sum(gaps) * 1000 / len(gaps) if gaps else 0.0, 1
        ),
        "overlapping_calls": sum(gap < 0 for gap in gaps),
    }


def warm_up_pipeline(
    target: Target, application: Any, run_id: str, worker: Worker
) -> None:
    """Send a few events first, so that the worker processes that take them open
    their clients and connections before the measurement."""
    from delivery.publishing import parse_envelope

    prefix = event_prefix(run_id, target.kind, target.phase, WARM_UP)
    warm = [parse_envelope(m.text) for m in make_messages(prefix, WARM_UP_EVENTS)]
    publish_paced(application, warm, WARM_UP_RATE)
    wait_delivered(target, prefix, len(warm), worker)


# The measurements of one kind.


@dataclass
class Context:
    options: Options
    run_id: str
    peers: Peers
    worker: Worker
    targets: dict[tuple[str, str], Target]


def arrival_times(
    reader: Reader | None, fallback: Callable[[], dict[str, float]]
) -> tuple[dict[str, float], str]:
    """Return arrival times from the reader, or from `fallback` without one, and
    which of the two they came from."""
    if reader is not None:
        return reader.collect(), "peer"
    return fallback(), "acknowledgement"


def require_all(
    arrivals: dict[str, float], messages: Sequence[Message], what: str
) -> None:
    missing = [m.event_id for m in messages if m.event_id not in arrivals]
    if missing:
        raise BenchError(
            f"{len(missing)} of {len(messages)} messages of {what} never arrived, "
            f"such as {missing[0]}."
        )


def raw_throughput(
    context: Context, kind: str, phase: str, repetition: int = 0
) -> dict[str, Any]:
    """Send N events with the raw client: as one stream batched as the library
    allows (RAW_THROUGHPUT), or in calls of one event per ordering key, each
    acknowledged before the next starts (RAW_PER_KEY)."""
    target = context.targets[kind, phase]
    prefix = event_prefix(context.run_id, kind, phase, f"{MEASURED}{repetition}")
    messages = make_messages(prefix, context.options.events)
    warm_prefix = event_prefix(context.run_id, kind, phase, WARM_UP)
    warm = make_messages(warm_prefix, WARM_UP_EVENTS)

    reader = start_reader(target, context.peers)
    client = raw_client(target, context.peers)
    try:
        client.send_all(warm)
        meter = CpuMeter(context.peers, kind)
        cpu_start = time.process_time()
        start = time.time()
        if phase == RAW_PER_KEY:
            # make_messages cycles through the keys, so each call of OBJECT_KEYS
            # consecutive messages contains one message per key.
            for call in chunks(messages, OBJECT_KEYS):
                client.send_call(call)
        else:
            client.send_all(messages)
        acknowledged = time.time()
        cpu = time.process_time() - cpu_start
        other_cpu = meter.per_event(len(messages))
    finally:
        client.close()

    arrivals, source = arrival_times(
        reader, lambda: {m.event_id: acknowledged for m in messages}
    )
    require_all(arrivals, messages, f"the raw {kind} throughput run")
    end = max(arrivals[m.event_id] for m in messages)
    return {
        "events": len(messages),
        "seconds": round(end - start, 3),
        "events_per_second": round(len(messages) / (end - start), 1),
        "end_is": "last arrival at the peer"
        if source == "peer"
        else "last acknowledgement",
        "client_cpu_ms_per_event": per_event_ms(cpu, len(messages)),
        **other_cpu,
    }


def pipeline_throughput(
    context: Context, kind: str, repetition: int = 0
) -> dict[str, Any]:
    from delivery.publishing import parse_envelope
    from destinations.models import Application

    target = context.targets[kind, PIPELINE_THROUGHPUT]
    application = Application.objects.get(pk=target.application_id)
    part = f"{MEASURED}{repetition}"
    prefix = event_prefix(context.run_id, kind, PIPELINE_THROUGHPUT, part)
    messages = make_messages(prefix, context.options.events)
    envelopes = [parse_envelope(message.text) for message in messages]

    reader = start_reader(target, context.peers)
    warm_up_pipeline(target, application, context.run_id, context.worker)
    worker_cpu_start = context.worker.cpu_seconds()
    meter = CpuMeter(context.peers, kind)
    publisher_cpu_start = time.process_time()
    commits: list[float] = []
    for batch in chunks(envelopes, context.options.batch_size):
        publish_batch(application, batch, lambda: commits.append(time.time()))
    publisher_cpu = time.process_time() - publisher_cpu_start
    wait_delivered(target, prefix, len(envelopes), context.worker)
    worker_cpu = context.worker.cpu_seconds() - worker_cpu_start
    other_cpu = meter.per_event(len(messages))

    arrivals, source = arrival_times(reader, lambda: attempt_ends(target, prefix))
    require_all(arrivals, messages, f"the pipeline {kind} throughput run")
    if source == "acknowledgement":
        accepted = context.peers.servicebus.accepted(target.name)
        sent = len(messages) + WARM_UP_EVENTS
        if accepted < sent:
            raise BenchError(
                f"The Service Bus peer logged {accepted} accepted messages for "
                f"{target.name}, fewer than the {sent} delivered."
            )
    start = commits[0]
    end = max(arrivals[m.event_id] for m in messages)
    return {
        "events": len(messages),
        "seconds": round(end - start, 3),
        "events_per_second": round(len(messages) / (end - start), 1),
        "publish_seconds": round(commits[-1] - commits[0], 3),
        "commits": len(commits),
        "end_is": "last arrival at the peer"
        if source == "peer"
        else "last attempt's end (send acknowledged)",
        "publisher_cpu_ms_per_event": per_event_ms(publisher_cpu, len(messages)),
        "worker_cpu_ms_per_event": per_event_ms(worker_cpu, len(messages)),
        **other_cpu,
        "worker": send_timeline(target, prefix),
    }


def raw_latency(context: Context, kind: str) -> dict[str, Any]:
    target = context.targets[kind, RAW_LATENCY]
    prefix = event_prefix(context.run_id, kind, RAW_LATENCY, MEASURED)
    count = max(1, round(context.options.rate * context.options.seconds))
    messages = make_messages(prefix, count)
    reader = start_reader(target, context.peers)
    client = raw_client(target, context.peers)
    sent: dict[str, float] = {}
    acknowledged: dict[str, float] = {}
    try:
        warm_prefix = event_prefix(context.run_id, kind, RAW_LATENCY, WARM_UP)
        for message in make_messages(warm_prefix, WARM_UP_EVENTS):
            client.send_one(message)
        cpu_start = time.process_time()
        start = time.time() + 0.1
        for index, message in enumerate(messages):
            pause = start + index / context.options.rate - time.time()
            if pause > 0:
                time.sleep(pause)
            sent[message.event_id] = time.time()
            client.send_one(message)
            acknowledged[message.event_id] = time.time()
        cpu = time.process_time() - cpu_start
    finally:
        client.close()

    result: dict[str, Any] = {
        "events": count,
        "achieved_rate": achieved_rate(sent),
        "ack_ms": summary_ms([acknowledged[i] - sent[i] for i in sent]),
        "client_cpu_ms_per_event": per_event_ms(cpu, count),
    }
    if reader is not None:
        arrivals = reader.collect()
        require_all(arrivals, messages, f"the raw {kind} latency run")
        result["arrival_ms"] = summary_ms([arrivals[i] - sent[i] for i in sent])
    return result


def pipeline_latency(context: Context, kind: str) -> dict[str, Any]:
    from delivery.publishing import parse_envelope
    from destinations.models import Application

    target = context.targets[kind, PIPELINE_LATENCY]
    application = Application.objects.get(pk=target.application_id)
    prefix = event_prefix(context.run_id, kind, PIPELINE_LATENCY, MEASURED)
    count = max(1, round(context.options.rate * context.options.seconds))
    messages = make_messages(prefix, count)
    envelopes = [parse_envelope(message.text) for message in messages]

    reader = start_reader(target, context.peers)
    warm_up_pipeline(target, application, context.run_id, context.worker)
    worker_cpu_start = context.worker.cpu_seconds()
    publisher_cpu_start = time.process_time()
    commits = publish_paced(application, envelopes, context.options.rate)
    publisher_cpu = time.process_time() - publisher_cpu_start
    wait_delivered(target, prefix, len(envelopes), context.worker)
    worker_cpu = context.worker.cpu_seconds() - worker_cpu_start

    times = attempt_times(target, prefix)
    result: dict[str, Any] = {
        "events": count,
        "achieved_rate": achieved_rate(commits),
        "ack_ms": summary_ms([times[i][1] - commits[i] for i in commits]),
        # Where the time goes: from the commit until the worker starts the
        # transport call (broker, task, claim), then the transport call itself.
        "commit_to_send_start_ms": summary_ms(
            [times[i][0] - commits[i] for i in commits]
        ),
        "transport_call_ms": summary_ms([times[i][1] - times[i][0] for i in commits]),
        "publisher_cpu_ms_per_event": per_event_ms(publisher_cpu, count),
        "worker_cpu_ms_per_event": per_event_ms(worker_cpu, count),
    }
    if reader is not None:
        arrivals = reader.collect()
        require_all(arrivals, messages, f"the pipeline {kind} latency run")
        result["arrival_ms"] = summary_ms([arrivals[i] - commits[i] for i in commits])
    return result


def per_event_ms(seconds: float, events: int) -> float:
    return round(seconds * 1000 / events, 2)


def achieved_rate(times: dict[str, float]) -> float:
    values = sorted(times.values())
    if len(values) < 2 or values[-1] == values[0]:
        return 0.0
    return round((len(values) - 1) / (values[-1] - values[0]), 1)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the run with the median rate (the lower middle one of an even
    number), with every run's rate beside it."""
    ordered = sorted(runs, key=lambda run: run["events_per_second"])
    median = dict(ordered[(len(ordered) - 1) // 2])
    median["rates_of_all_runs"] = [run["events_per_second"] for run in runs]
    return median


def measure_kind(context: Context, kind: str) -> dict[str, Any]:
    raw_runs: list[dict[str, Any]] = []
    pipeline_runs: list[dict[str, Any]] = []
    print(f"Measuring {KIND_LABELS[kind]}:", flush=True)
    # Without history, the database is new before the first kind. VACUUM of empty
    # tables records them as empty, and PostgreSQL then planned sequential scans
    # that slowed each run more than the one before, as the tables grew.
    if context.options.history or kind != context.options.kinds[0]:
        vacuum_database()
    for repetition in range(context.options.repeat):
        # With history, each pair starts from a vacuumed database, as it would
        # with autovacuum on: without it, each pipeline run paid for the dead rows
        # of the runs before it.
        if context.options.history and repetition:
            vacuum_database()
        print(f"  throughput, run {repetition + 1}: raw...", flush=True)
        raw_runs.append(raw_throughput(context, kind, RAW_THROUGHPUT, repetition))
        print(f"  throughput, run {repetition + 1}: pipeline...", flush=True)
        pipeline_runs.append(pipeline_throughput(context, kind, repetition))
    raw_tp, pipe_tp = median_run(raw_runs), median_run(pipeline_runs)
    print("  raw throughput, one event per key per call...", flush=True)
    raw_per_key = raw_throughput(context, kind, RAW_PER_KEY)
    print("  raw latency...", flush=True)
    raw_lat = raw_latency(context, kind)
    print("  pipeline latency...", flush=True)
    pipe_lat = pipeline_latency(context, kind)

    # Each pair is a raw run and the pipeline run that followed it, so that a
    # slow stretch of the machine slows both sides of a ratio.
    ratios = [
        pipeline["events_per_second"] / raw["events_per_second"]
        for raw, pipeline in zip(raw_runs, pipeline_runs, strict=True)
    ]
    ratio = statistics.median(ratios)
    ratio_of_medians = pipe_tp["events_per_second"] / raw_tp["events_per_second"]
    # The pipeline's arrival latency where the peer stamps arrivals; Service Bus's
    # peer does not, so there it is the attempt's end, when the send was
    # acknowledged.
    pipeline_ms = pipe_lat.get("arrival_ms", pipe_lat["ack_ms"])
    limit_ms = raw_lat["ack_ms"]["p50"] + LATENCY_TARGET_MS
    return {
        "throughput": {
            "raw": raw_tp,
            "raw_per_key": raw_per_key,
            "pipeline": pipe_tp,
            "ratio": round(ratio, 3),
            "ratios_of_pairs": [round(value, 3) for value in ratios],
            "ratio_of_medians": round(ratio_of_medians, 3),
            "target": f"median of pipeline / raw per pair >= {THROUGHPUT_TARGET}",
            "passed": ratio >= THROUGHPUT_TARGET,
        },
        "latency": {
            "raw": raw_lat,
            "pipeline": pipe_lat,
            "pipeline_latency_is": "arrival at the peer"
            if "arrival_ms" in pipe_lat
            else "attempt end (send acknowledged)",
            "target": f"pipeline p50 <= raw ack p50 + {LATENCY_TARGET_MS:g} ms",
            "limit_ms": round(limit_ms, 1),
            "passed": pipeline_ms["p50"] <= limit_ms,
        },
    }


# Setting up the services.


def reset_database() -> None:
    """Drop and recreate bench_portal; only this benchmark uses it."""
    with psycopg.connect(f"{SERVER_URL}/postgres", autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {DATABASE_NAME} WITH (FORCE)")
        connection.execute(f"CREATE DATABASE {DATABASE_NAME}")


def vacuum_database() -> None:
    """Remove the dead rows that earlier measurements left in bench_portal and
    refresh the planner's statistics, as autovacuum would on a server where it is
    on. Without it, each kind would pay for the rows of the kinds measured before."""
    with psycopg.connect(DATABASE_URL, autocommit=True) as connection:
        connection.execute("VACUUM (ANALYZE)")


# Delivered events in bulk, each with its delivery and its attempt, written by
# PostgreSQL itself. They go to a disabled destination of their own, so that the
# benchmark's queries of the measured destinations do not read them, and their ids
# share no prefix with the measured events.
_HISTORY_SQL = (
    """
    INSERT INTO delivery_event (id, stage, type, object_key, time, data, is_test,
        recorded_at, application_id, envelope_json)
    SELECT 'history-' || n, %(stage)s, 'order.action', 'history/' || n %% 5000,
        %(start)s + n * interval '10 ms', %(data)s::jsonb, false,
        %(start)s + n * interval '10 ms', %(application)s, %(envelope)s
    FROM generate_series(1, %(count)s) AS n
    """,
    """
    INSERT INTO delivery_delivery (event_id, destination_id, status, ordering_key,
        event_time, is_test, attempt_count, next_attempt_at, scheduled_at,
        lease_expires_at, claimed_by, created_at, updated_at)
    SELECT id, %(destination)s, 'delivered', object_key, time, false, 1, NULL, time,
        NULL, '', time, time
    FROM delivery_event WHERE id LIKE 'history-%%'
    """,
    """
    INSERT INTO delivery_attempt (delivery_id, destination_id, is_test, started_at,
        duration_ms, outcome, error_kind, message, remote_message_id)
    SELECT id, destination_id, false, created_at, 5, 'success', '', '', ''
    FROM delivery_delivery WHERE event_id LIKE 'history-%%'
    """,
)


def seed_history(count: int) -> float:
    """Record `count` delivered events, with their deliveries and attempts, that
    went out over the hours before the benchmark; return the seconds it took.

    A database in use contains many more finished deliveries than unfinished ones,
    and PostgreSQL plans the claim's queries with that in its statistics.
    """
    from destinations.models import Destination

    if not count:
        return 0.0
    start = time.monotonic()
    sample = json.loads(SAMPLE_EVENT.read_text(encoding="utf-8"))
    # A copy of a measured destination, disabled: nothing is sent to it.
    history = Destination.objects.order_by("pk").first()
    if history is None:
        raise BenchError("There is no destination to copy for the history.")
    history.pk = None
    history._state.adding = True
    history.name = "History"
    history.enabled = False
    history.save()
    with psycopg.connect(DATABASE_URL, autocommit=True) as connection:
        parameters = {
            "count": count,
            "destination": history.pk,
            "application": history.application_id,
            "stage": history.stage,
            "start": datetime.now(UTC) - timedelta(seconds=count / 100 + 3600),
            "data": json.dumps(sample["data"]),
            "envelope": json.dumps(sample),
        }
        with connection.transaction():
            for statement in _HISTORY_SQL:
                connection.execute(statement, parameters)
    return time.monotonic() - start


def reset_broker() -> None:
    client = redis.Redis.from_url(BROKER_URL)
    try:
        client.flushdb()
    finally:
        client.close()


def configure_process(peers: Peers, encryption_key: str) -> None:
    """Point this process's Django at bench_portal, Redis and the peers."""
    for name in AWS_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "ENV_FILE": "",
            "DATABASE_URL": DATABASE_URL,
            "CELERY_BROKER_URL": BROKER_URL,
            "ENCRYPTION_KEYS": encryption_key,
            "LOG_LEVEL": "WARNING",
            **peers.environment(),
        }
    )
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)


def revision() -> dict[str, Any]:
    """Return the commit measured and the files of the pipeline changed since it,
    because other work may be in progress in the same checkout."""

    def git(*arguments: str) -> str:
        completed = subprocess.run(
            ["git", *arguments], cwd=BASE_DIR, capture_output=True, text=True
        )
        return completed.stdout

    # Each porcelain line is a two-letter status, a space and the path.
    changed = git("status", "--porcelain", "--", "delivery", "portal")
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "uncommitted": [line[3:] for line in changed.splitlines()],
    }


def machine() -> dict[str, Any]:
    from django.db import connection

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = 0.0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        postgres = cursor.fetchone()[0]
        cursor.execute("SHOW autovacuum")
        autovacuum = cursor.fetchone()[0]

    client = redis.Redis.from_url(BROKER_URL)
    try:
        redis_version = client.info("server")["redis_version"]
    finally:
        client.close()
    packages = (
        "django",
        "celery",
        "kombu",
        "psycopg",
        "boto3",
        "moto",
        "google-cloud-pubsub",
        "grpcio",
        "azure-servicebus",
        "python-qpid-proton",
    )
    return {
        "revision": revision(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "postgresql": postgres,
        "postgresql_autovacuum": autovacuum,
        "redis": redis_version,
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
        "packages": {name: importlib.metadata.version(name) for name in packages},
    }


# Output.


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Align the first column left and the others right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])]
        pairs = zip(row[1:], widths[1:], strict=True)
        cells += [cell.rjust(width) for cell, width in pairs]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def pair(summary: dict[str, float] | None) -> str:
    """Format a latency summary as "p50 / p99"."""
    if not summary:
        return "-"
    return f"{summary['p50']:.1f} / {summary['p99']:.1f}"


def print_tables(options: Options, results: dict[str, Any]) -> None:
    rows = []
    for kind, result in results.items():
        throughput = result["throughput"]
        raw, pipeline = throughput["raw"], throughput["pipeline"]
        verdict = "PASS" if throughput["passed"] else "FAIL"
        rows.append(
            [
                KIND_LABELS[kind],
                f"{raw['events_per_second']:.1f}",
                f"{throughput['raw_per_key']['events_per_second']:.1f}",
                f"{pipeline['events_per_second']:.1f}",
                f"{throughput['ratio']:.2f}",
                f"{throughput['ratio_of_medians']:.2f}",
                f"{raw['client_cpu_ms_per_event']:.2f}",
                f"{pipeline['worker_cpu_ms_per_event']:.2f}",
                f"{verdict} (ratio >= {THROUGHPUT_TARGET})",
            ]
        )
    print(
        f"\nThroughput: {options.events} events over {OBJECT_KEYS} object keys, "
        f"worker --concurrency {options.workers}, median of {options.repeat} runs; "
        "ratio: the median of the pairs' ratios"
    )
    header = ["kind", "raw ev/s", "raw 1/key ev/s", "pipeline ev/s", "ratio"]
    header += ["ratio of medians"]
    header += ["raw CPU ms/ev", "worker CPU ms/ev", "target"]
    print(format_table(header, rows))

    rows = []
    for kind, result in results.items():
        latency = result["latency"]
        raw, pipeline = latency["raw"], latency["pipeline"]
        verdict = "PASS" if latency["passed"] else "FAIL"
        rows.append(
            [
                KIND_LABELS[kind],
                pair(raw["ack_ms"]),
                pair(pipeline.get("arrival_ms")),
                pair(pipeline["ack_ms"]),
                pair(pipeline["commit_to_send_start_ms"]),
                f"{pipeline['achieved_rate']:.1f}",
                f"{verdict} (p50 <= {latency['limit_ms']:.1f})",
            ]
        )
    print(
        f"\nLatency in ms (p50 / p99), one event per commit at {options.rate:g}/s "
        f"for {options.seconds:g} s"
    )
    header = ["kind", "raw ack", "pipeline arrival", "pipeline ack"]
    header += ["commit to send", "published ev/s", "target"]
    print(format_table(header, rows))


def write_result(path: Path, document: dict[str, Any]) -> None:
    text = json.dumps(document, indent=2, default=str) + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    run_id = uuid.uuid4().hex[:8]

    encryption_key = Fernet.generate_key().decode()
    reset_database()
    reset_broker()
    servicebus_entities = [target_name(phase, run_id) for phase in PHASES]
    peers = start_peers(servicebus_entities, stamp)
    worker: Worker | None = None
    results: dict[str, Any] = {}
    history_seconds = 0.0
    try:
        configure_process(peers, encryption_key)
        targets = create_targets(options.kinds, run_id, peers)
        for (_, phase), target in targets.items():
            if phase in (PIPELINE_THROUGHPUT, PIPELINE_LATENCY):
                create_destination(target, peers)
        if options.history:
            print(f"Recording {options.history:,} delivered events...", flush=True)
            history_seconds = seed_history(options.history)
        about_machine = machine()
        environment = worker_environment(peers, encryption_key, options.worker_settings)
        worker = Worker(options.workers, environment, stamp)
        worker.wait_until_ready()

        context = Context(options, run_id, peers, worker, targets)
        for kind in options.kinds:
            results[kind] = measure_kind(context, kind)
    except BenchError as error:
        print(f"The benchmark stopped: {error}", file=sys.stderr)
        return 1
    finally:
        Reader.kill_all()
        if worker is not None:
            worker.stop()
        peers.stop()

    print_tables(options, results)
    about_machine["load_average_at_end"] = [round(load, 2) for load in os.getloadavg()]
    path = OUTPUT_DIR / f"delivery-{stamp}.json"
    write_result(
        path,
        {
            "started_at": started.isoformat(),
            "command": "python -m bench.delivery " + " ".join(sys.argv[1:]),
            "options": asdict(options),
            "object_keys": OBJECT_KEYS,
            "machine": about_machine,
            "history_seconds": round(history_seconds, 1),
            "results": results,
            "worker_log": str(worker.log_path) if worker else "",
        },
    )
    print(f"\nWrote {path.relative_to(BASE_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
