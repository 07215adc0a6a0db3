"""The SQS transport and the delivery engine, sending over HTTP to moto's server.

These tests run the engine in the test process; tests/test_send_test_event.py runs it
in a Celery worker process.
"""

import json
import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from pytest_django import Settings

from delivery import engine
from delivery.ids import new_ulid
from delivery.models import Attempt, Delivery, DeliveryStatus, Event, Outcome
from delivery.peers.sqs import (
    FAKE_ACCESS_KEY_ID,
    FAKE_SECRET_ACCESS_KEY,
    create_queue,
    free_port,
    sqs_client,
    start_sqs_peer,
)
from delivery.transports import (
    TRANSPORTS,
    Blame,
    Failure,
    OutgoingMessage,
    Result,
    Sent,
    Transport,
)
from delivery.transports import sqs as sqs_module
from delivery.transports.sqs import (
    Entry,
    SqsTransport,
    _OnePerGroup,
    classify_error,
    fifo_id,
    message_size,
    queue_region,
)
from destinations.models import Application, Destination, Kind, Stage

if TYPE_CHECKING:
    from .conftest import PeerQueue

FIXTURES = Path(__file__).parent / "fixtures"
LARGE_FIXTURE = FIXTURES / "order_action_cancel_large_400_lines.json"

pytestmark = pytest.mark.django_db

MakeQueue = Callable[..., "PeerQueue"]


@pytest.fixture
def application() -> Application:
    return Application.objects.create(name="Orders", slug="orders")


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


def publish(
    destination: Destination,
    *,
    event_id: str | None = None,
    event_type: str = "ORDER_CREATED",
    object_key: str = "order-1",
    time: datetime | None = None,
    data: Any = None,
) -> Delivery:
    event = Event.objects.create(
        id=event_id or new_ulid(),
        application=destination.application,
        stage=destination.stage,
        type=event_type,
        object_key=object_key,
        time=time or datetime(2025, 3, 3, 11, 0, tzinfo=UTC),
        data={"order_id": object_key} if data is None else data,
    )
    return Delivery.objects.create(event=event, destination=destination)


def deliver(delivery: Delivery) -> Attempt:
    """Run the engine on `delivery` and return its only attempt."""
    engine.deliver(delivery.pk)
    delivery.refresh_from_db()
    attempts = list(delivery.attempts.all())
    assert len(attempts) == 1
    return attempts[0]


def send_recording_batches(
    destination: Destination, messages: list[OutgoingMessage]
) -> tuple[list[Result], list[list[dict[str, Any]]]]:
    """Send with the transport; return its results and the entries of each
    SendMessageBatch call it made, read from botocore's request parameters."""
    client = sqs_module._client(
        sqs_module._Identity.for_stage(destination.stage), queue_region(destination)
    )
    calls: list[list[dict[str, Any]]] = []

    def record_call(params: dict[str, Any], **_: Any) -> None:
        calls.append(list(params["Entries"]))

    event = "provide-client-params.sqs.SendMessageBatch"
    client.meta.events.register(event, record_call)
    try:
        results = SqsTransport(destination).send(messages)
    finally:
        client.meta.events.unregister(event, record_call)
    return results, calls


@pytest.fixture
def unreachable_destination(
    settings: Settings, application: Application
) -> Destination:
    """A TEST destination whose stage sends to a port nothing listens on."""
    identity = {
        "aws_access_key_id": FAKE_ACCESS_KEY_ID,
        "aws_secret_access_key": FAKE_SECRET_ACCESS_KEY,
        "aws_profile": "",
        # Nothing listens there once free_port has closed its socket.
        "sqs_endpoint_url": f"http://127.0.0.1:{free_port()}",
    }
    settings.STAGE_IDENTITIES = {"TEST": identity, "PROD": identity}
    return Destination.objects.create(
        application=application,
        stage=Stage.TEST,
        kind=Kind.SQS,
        name="unreachable",
        sqs_queue_url="https://sqs.eu-west-1.amazonaws.com/123456789012/unreachable",
    )


def outgoing(event_id: str, object_key: str, body: bytes) -> OutgoingMessage:
    return OutgoingMessage(
        event_id=event_id, event_type="ORDER_CREATED", object_key=object_key, body=body
    )


def attribute(message: dict[str, Any], name: str) -> str:
    return str(message["MessageAttributes"][name]["StringValue"])


# Sending over the wire.


def test_fifo_queue_receives_envelope_and_ids(
    sqs_endpoint: Any, make_sqs_queue: MakeQueue, application: Application
) -> None:
    queue = make_sqs_queue(fifo=True)
    delivery = publish(sqs_destination(application, queue), object_key="order-42")

    attempt = deliver(delivery)

    messages = queue.receive()
    assert len(messages) == 1
    message = messages[0]
    assert message["Body"] == delivery.event.body().decode()
    assert attribute(message, "event_id") == delivery.event.id
    assert attribute(message, "event_type") == "ORDER_CREATED"
    assert message["MessageAttributes"]["event_id"]["DataType"] == "String"
    assert message["Attributes"]["MessageGroupId"] == "order-42"
    assert message["Attributes"]["MessageDeduplicationId"] == delivery.event.id
    assert attempt.outcome == Outcome.SUCCESS
    assert attempt.remote_message_id == message["MessageId"]
    assert attempt.error_kind == ""
    assert delivery.status == DeliveryStatus.DELIVERED
    assert delivery.attempt_count == 1


def test_standard_queue_receives_no_group_id(
    sqs_endpoint: Any, make_sqs_queue: MakeQueue, application: Application
) -> None:
    queue = make_sqs_queue()
    delivery = publish(sqs_destination(application, queue))

    attempt = deliver(delivery)

    messages = queue.receive()
    assert len(messages) == 1
    message = messages[0]
    assert message["Body"] == delivery.event.body().decode()
    assert attribute(message, "event_id") == delivery.event.id
    assert attribute(message, "event_type") == "ORDER_CREATED"
    assert "MessageGroupId" not in message["Attributes"]
    assert "MessageDeduplicationId" not in message["Attributes"]
    assert attempt.outcome == Outcome.SUCCESS
    assert attempt.remote_message_id == message["MessageId"]


def test_missing_queue_fails_permanently(
    sqs_endpoint: Any, application: Application
) -> None:
    url = "https://sqs.eu-west-1.amazonaws.com/123456789012/no-such-queue"
    destination = Destination.objects.create(
        application=application,
        stage=Stage.TEST,
        kind=Kind.SQS,
        name="missing",
        sqs_queue_url=url,
    )
    delivery = publish(destination)

    attempt = deliver(delivery)

    assert attempt.outcome == Outcome.PERMANENT_ERROR
    assert attempt.error_kind == "queue_not_found"
    assert url in attempt.message
    assert "TEST" in attempt.message
    # The destination is at fault: it is paused and the delivery waits, first in line.
    assert delivery.status == DeliveryStatus.PENDING
    destination.refresh_from_db()
    assert destination.paused_at is not None
    assert url in destination.pause_reason


def test_large_fixture_fits_default_size(
    sqs_endpoint: Any, make_sqs_queue: MakeQueue, application: Application
) -> None:
    envelope = json.loads(LARGE_FIXTURE.read_bytes())
    queue = make_sqs_queue(max_size=262_144)
    delivery = publish(
        sqs_destination(application, queue),
        event_id=envelope["id"],
        event_type=envelope["type"],
        time=datetime.fromisoformat(envelope["time"]),
        data=envelope["data"],
    )

    attempt = deliver(delivery)

    messages = queue.receive()
    assert attempt.outcome == Outcome.SUCCESS
    assert len(messages) == 1
    body = messages[0]["Body"]
    assert body == delivery.event.body().decode()
    assert json.loads(body) == envelope
    # The file is the compact envelope plus a newline. Key order may differ (jsonb
    # sorts keys), but the length of compact JSON does not depend on it.
    assert len(body.encode()) == len(LARGE_FIXTURE.read_bytes().rstrip(b"\n"))
    assert attempt.remote_message_id == messages[0]["MessageId"]


def test_large_fixture_rejected_by_smaller_queue(
    sqs_endpoint: Any, make_sqs_queue: MakeQueue, application: Application
) -> None:
    envelope = json.loads(LARGE_FIXTURE.read_bytes())
    queue = make_sqs_queue(max_size=230_000)
    delivery = publish(
        sqs_destination(application, queue),
        event_id=envelope["id"],
        event_type=envelope["type"],
        time=datetime.fromisoformat(envelope["time"]),
        data=envelope["data"],
    )

    attempt = deliver(delivery)

    assert attempt.outcome == Outcome.PERMANENT_ERROR
    assert attempt.error_kind == "too_large"
    assert "230,000 bytes" in attempt.message
    # Body (230,988) plus the attributes' names, types and values (62).
    assert "231,050 bytes" in attempt.message
    assert queue.url in attempt.message
    assert queue.receive() == []


def test_multibyte_body_rejected_by_byte_count(
    sqs_endpoint: Any, make_sqs_queue: MakeQueue, application: Application
) -> None:
    queue = make_sqs_queue(max_size=262_144)
    # 90,000 characters but 270,000 bytes: "€" is three bytes in UTF-8.
    delivery = publish(sqs_destination(application, queue), data={"note": "€" * 90_000})
    body = delivery.event.body().decode()
    assert len(body) < 262_144
    assert len(body.encode()) > 262_144

    attempt = deliver(delivery)

    assert attempt.outcome == Outcome.PERMANENT_ERROR
    assert attempt.error_kind == "too_large"
    assert "262,144 bytes" in attempt.message
    assert queue.receive() == []


def test_moto_counts_characters_not_bytes(make_sqs_queue: MakeQueue) -> None:
    # Why the transport checks sizes itself: moto accepts what real SQS would not.
    queue = make_sqs_queue(max_size=262_144)

    sqs_client(queue.endpoint_url).send_message(
        QueueUrl=queue.peer_url, MessageBody="€" * 90_000
    )

    assert len(queue.receive()) == 1


def test_long_object_key_gets_hashed_group_id(
    sqs_endpoint: Any, make_sqs_queue: MakeQueue, application: Application
) -> None:
    queue = make_sqs_queue(fifo=True)
    object_key = "order/" + "x" * 200
    delivery = publish(sqs_destination(application, queue), object_key=object_key)

    attempt = deliver(delivery)

    messages = queue.receive()
    assert attempt.outcome == Outcome.SUCCESS
    assert len(messages) == 1
    assert messages[0]["Attributes"]["MessageGroupId"] == fifo_id(object_key)
    assert fifo_id(object_key).startswith("sha256-")


def test_invalid_object_key_gets_hashed_group_id(
    sqs_endpoint: Any, make_sqs_queue: MakeQueue, application: Application
) -> None:
    queue = make_sqs_queue(fifo=True)
    object_key = "commande n° 7"
    delivery = publish(sqs_destination(application, queue), object_key=object_key)

    attempt = deliver(delivery)

    messages = queue.receive()
    assert attempt.outcome == Outcome.SUCCESS
    assert len(messages) == 1
    assert messages[0]["Attributes"]["MessageGroupId"] == fifo_id(object_key)


def test_closed_port_is_transient_error(
    unreachable_destination: Destination,
) -> None:
    destination = unreachable_destination
    delivery = publish(destination)

    attempt = deliver(delivery)

    assert attempt.outcome == Outcome.TRANSIENT_ERROR
    assert attempt.error_kind == "connection_failed"
    assert destination.sqs_queue_url in attempt.message
    assert FAKE_SECRET_ACCESS_KEY not in attempt.message
    # Transient: the delivery is scheduled again, later.
    assert delivery.status == DeliveryStatus.PENDING
    assert delivery.next_attempt_at is not None
    assert delivery.next_attempt_at > attempt.started_at


def test_batch_results_keep_message_order(
    sqs_endpoint: Any, make_sqs_queue: MakeQueue, application: Application
) -> None:
    queue = make_sqs_queue()
    transport = SqsTransport(sqs_destination(application, queue))
    messages = [
        outgoing(new_ulid(), f"order-{n}", json.dumps({"n": n}).encode())
        for n in range(12)
    ]

    results = transport.send(messages)

    assert len(results) == 12
    assert all(isinstance(result, Sent) for result in results)
    received: dict[str, str] = {}
    while batch := queue.receive():
        received.update({item["MessageId"]: item["Body"] for item in batch})
    for message, result in zip(messages, results, strict=True):
        assert isinstance(result, Sent)
        assert received[result.remote_message_id] == message.body.decode()


def test_fifo_batch_fails_only_bad_message(
    sqs_endpoint: Any, make_sqs_queue: MakeQueue, application: Application
) -> None:
    queue = make_sqs_queue(fifo=True)
    transport = SqsTransport(sqs_destination(application, queue))
    # The first send caches the queue's MaximumMessageSize (1 MiB by default).
    first = transport.send(
        [outgoing(new_ulid(), "order-1", b'"' + b"a" * 2_000 + b'"')]
    )
    assert isinstance(first[0], Sent)
    # A smaller limit set since then is unknown to the transport until its cache
    # expires, so SQS itself rejects the large entry, failing the whole batch call.
    queue.set_attributes(MaximumMessageSize="1024")
    small_body = b'{"size":"small"}'
    batch = [
        outgoing(new_ulid(), "order-2", small_body),
        outgoing(new_ulid(), "order-3", b'"' + b"b" * 2_000 + b'"'),
        outgoing(new_ulid(), "order-4", small_body),
    ]

    results = transport.send(batch)

    assert isinstance(results[0], Sent)
    assert isinstance(results[1], Failure)
    assert results[1].kind == "too_large"
    assert results[1].message.startswith("SQS rejected the message as too large")
    assert results[1].blame == Blame.MESSAGE
    assert isinstance(results[2], Sent)
    received = queue.receive()
    assert len(received) == 3


def test_fifo_calls_carry_one_entry_per_group(
    sqs_endpoint: Any, make_sqs_queue: MakeQueue, application: Application
) -> None:
    queue = make_sqs_queue(fifo=True)
    destination = sqs_destination(application, queue)
    keys = ["order-a", "order-a", "order-b", "order-a", "order-b", "order-c"]
    messages = [
        outgoing(f"evt-{n}", key, json.dumps({"n": n}).encode())
        for n, key in enumerate(keys)
    ]
    results, batch_calls = send_recording_batches(destination, messages)
    calls = [[entry["MessageGroupId"] for entry in call] for call in batch_calls]

    assert all(isinstance(result, Sent) for result in results)
    assert calls == [
        ["order-a", "order-b", "order-c"],
        ["order-a", "order-b"],
    ]
    received = []
    while batch := queue.receive():
        received += [
            (item["Attributes"]["MessageGroupId"], item["Body"]) for item in batch
        ]
    for key in ("order-a", "order-b"):
        bodies = [json.loads(body)["n"] for group, body in received if group == key]
        assert bodies == [n for n, k in enumerate(keys) if k == key]


def entry(index: int, group: str) -> Entry:
    return (index, {"MessageGroupId": group, "MessageBody": "{}"}, 100)


def test_group_stops_at_blocking_failure() -> None:
    entries = [entry(0, "a"), entry(1, "b"), entry(2, "a"), entry(3, "b")]
    outage = Failure(kind="connection_failed", message="down", permanent=False)
    too_large = Failure(
        kind="too_large", message="big", permanent=True, blame=Blame.MESSAGE
    )
    by_group = _OnePerGroup(entries)
    sent_calls = []

    for batch in by_group:
        sent_calls.append([index for index, _, _ in batch])
        results: list[Result] = [
            {0: outage, 1: too_large}.get(index, Sent("m")) for index, _, _ in batch
        ]
        by_group.after(batch, results)

    # Group a failed for a reason that is not the message's own: entry 2 is not
    # sent. Group b's first entry was too large, which stops nothing.
    assert sent_calls == [[0, 1], [3]]
    assert by_group.not_sent == {2: outage}


def test_full_call_defers_groups() -> None:
    groups = [f"g{n}" for n in range(11)] + ["g0"]
    by_group = _OnePerGroup([entry(n, group) for n, group in enumerate(groups)])

    calls = [[index for index, _, _ in batch] for batch in by_group]

    assert calls == [list(range(10)), [10, 11]]


def test_calls_take_longest_groups_first() -> None:
    # A claim brings each key's run in one piece: 12 groups of 20 entries in a row.
    entries = [entry(n, f"g{n // 20}") for n in range(240)]
    by_group = _OnePerGroup(entries)

    calls = [[index for index, _, _ in batch] for batch in by_group]

    # Taking the first ten groups until they ran out would take 20 calls of 10 and
    # then 20 calls of 2 for the last two groups. Every call can carry 10.
    assert [len(call) for call in calls] == [10] * 24
    sent_order = [index for call in calls for index in call]
    assert sorted(sent_order) == list(range(240))
    for call in calls:
        assert len({entries[index][1]["MessageGroupId"] for index in call}) == 10
    for group in range(12):
        in_group = [index for index in sent_order if index // 20 == group]
        assert in_group == sorted(in_group)


def test_calls_skip_an_entry_over_the_byte_limit() -> None:
    def large(index: int, group: str) -> Entry:
        return (index, {"MessageGroupId": group, "MessageBody": "x"}, 200_000)

    entries = [large(0, "a"), entry(1, "b"), entry(2, "b"), large(3, "c")]
    by_group = _OnePerGroup(entries)

    calls = [[index for index, _, _ in batch] for batch in by_group]

    # Group b is the longest; a and c do not fit in one call together.
    assert calls == [[0, 1], [2, 3]]


def test_whole_call_failure_stops_all() -> None:
    groups = [f"g{n}" for n in range(11)]
    outage = Failure(kind="connection_failed", message="down", permanent=False)
    by_group = _OnePerGroup([entry(n, group) for n, group in enumerate(groups)])
    calls = []

    for batch in by_group:
        calls.append([index for index, _, _ in batch])
        by_group.after(batch, [outage] * len(batch))

    assert calls == [list(range(10))]
    assert by_group.not_sent == {10: outage}


def test_outage_stops_standard_send(unreachable_destination: Destination) -> None:
    messages = [outgoing(f"evt-{n}", f"order-{n}", b"{}") for n in range(25)]

    results, batch_calls = send_recording_batches(unreachable_destination, messages)
    calls = [len(call) for call in batch_calls]

    # Three calls of up to 10 would be needed; the first one's outage ends the send.
    assert calls == [10]
    kinds = {result.kind for result in results if isinstance(result, Failure)}
    assert kinds == {"connection_failed"}
    assert len([result for result in results if isinstance(result, Failure)]) == 25


def test_peer_stamps_current_sent_timestamp(
    sqs_endpoint: Any, make_sqs_queue: MakeQueue, application: Application
) -> None:
    queue = make_sqs_queue(fifo=True)
    transport = SqsTransport(sqs_destination(application, queue))
    before_ms = time.time() * 1000

    [result] = transport.send([outgoing("evt-1", "order-1", b"{}")])

    after_ms = time.time() * 1000
    assert isinstance(result, Sent)
    [message] = queue.receive()
    sent_ms = int(message["Attributes"]["SentTimestamp"])
    # SentTimestamp is whole milliseconds.
    assert before_ms - 1 <= sent_ms <= after_ms
    # In flight after the receive: not received again within its visibility timeout.
    assert queue.receive() == []


def test_noncharacter_sent_as_json_escape(
    sqs_endpoint: Any, make_sqs_queue: MakeQueue, application: Application
) -> None:
    queue = make_sqs_queue()
    transport = SqsTransport(sqs_destination(application, queue))
    # U+FFFE is valid in JSON and UTF-8 but outside the characters SQS allows.
    body = json.dumps({"note": "a\ufffeb"}, ensure_ascii=False).encode()

    results = transport.send([outgoing(new_ulid(), "order-1", body)])

    assert isinstance(results[0], Sent)
    messages = queue.receive()
    assert len(messages) == 1
    assert messages[0]["Body"] == '{"note": "a\\ufffeb"}'
    assert json.loads(messages[0]["Body"]) == {"note": "a\ufffeb"}


def test_invalid_utf8_body_is_rejected(
    sqs_endpoint: Any, make_sqs_queue: MakeQueue, application: Application
) -> None:
    queue = make_sqs_queue()
    transport = SqsTransport(sqs_destination(application, queue))

    results = transport.send([outgoing(new_ulid(), "order-1", b'"\xff"')])

    assert isinstance(results[0], Failure)
    assert results[0].kind == "invalid_message"
    assert results[0].blame == Blame.MESSAGE
    assert "not valid UTF-8" in results[0].message
    assert queue.receive() == []


def test_subprocess_peer_serves_sqs() -> None:
    peer = start_sqs_peer(in_process=False)
    try:
        queue_url = create_queue(peer.endpoint_url, "subprocess-peer")
        client = sqs_client(peer.endpoint_url)
        client.send_message(QueueUrl=queue_url, MessageBody="hello")
        received = client.receive_message(QueueUrl=queue_url)["Messages"]
        assert [message["Body"] for message in received] == ["hello"]

        peer.reset()

        assert "QueueUrls" not in client.list_queues()
    finally:
        peer.stop()
    with pytest.raises(OSError):
        socket.create_connection((peer.host, peer.port), timeout=1)


# The engine.


def test_deliver_skips_claimed_delivery(
    sqs_endpoint: Any, make_sqs_queue: MakeQueue, application: Application
) -> None:
    queue = make_sqs_queue()
    delivery = publish(sqs_destination(application, queue))
    deliver(delivery)

    engine.deliver(delivery.pk)

    assert delivery.attempts.count() == 1
    assert len(queue.receive()) == 1


def test_kind_without_transport_fails_permanently(
    monkeypatch: pytest.MonkeyPatch,
    sqs_endpoint: Any,
    make_sqs_queue: MakeQueue,
    application: Application,
) -> None:
    monkeypatch.delitem(TRANSPORTS, Kind.SQS)
    delivery = publish(sqs_destination(application, make_sqs_queue()))

    attempt = deliver(delivery)

    assert attempt.outcome == Outcome.PERMANENT_ERROR
    assert attempt.error_kind == "not_available"
    assert attempt.message == "Sending to AWS SQS is not available."


class ExplodingTransport(Transport):
    kind = Kind.SQS

    def send(self, messages: Any) -> list[Result]:
        raise RuntimeError("secret-looking detail")


def test_transport_exception_is_transient_error(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    make_sqs_queue: MakeQueue,
    application: Application,
) -> None:
    monkeypatch.setitem(TRANSPORTS, Kind.SQS, ExplodingTransport)
    delivery = publish(sqs_destination(application, make_sqs_queue()))

    with caplog.at_level(logging.INFO, logger="delivery"):
        attempt = deliver(delivery)

    assert attempt.outcome == Outcome.TRANSIENT_ERROR
    assert attempt.error_kind == "internal_error"
    assert "RuntimeError" in attempt.message
    assert "secret-looking detail" not in attempt.message
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert delivery.event_id in errors[0].getMessage()
    assert str(delivery.destination_id) in errors[0].getMessage()


def test_deliver_logs_start_and_outcome(
    caplog: pytest.LogCaptureFixture,
    sqs_endpoint: Any,
    make_sqs_queue: MakeQueue,
    application: Application,
) -> None:
    delivery = publish(sqs_destination(application, make_sqs_queue()))

    with caplog.at_level(logging.INFO, logger="delivery"):
        deliver(delivery)

    lines = [record.getMessage() for record in caplog.records]
    assert any(
        line.startswith("Sending 1 events") and delivery.event_id in line
        for line in lines
    )
    delivered = f"Delivered 1 events to destination {delivery.destination_id} in "
    assert any(line.startswith(delivered) for line in lines)
    assert not any(FAKE_SECRET_ACCESS_KEY in line for line in lines)


# Pure mappings.


def test_fifo_id_keeps_valid_value() -> None:
    value = "order-1!#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" + '"'
    assert fifo_id(value) == value


def test_fifo_id_keeps_128_characters() -> None:
    assert fifo_id("k" * 128) == "k" * 128


@pytest.mark.parametrize(
    "value",
    ["k" * 129, "has space", "accentué", "tab\there", ""],
    ids=["too-long", "space", "non-ascii", "tab", "empty"],
)
def test_fifo_id_hashes_invalid_value(value: str) -> None:
    mapped = fifo_id(value)
    assert mapped.startswith("sha256-")
    assert len(mapped) == 71
    assert mapped == fifo_id(value)


def test_message_size_counts_utf8_bytes() -> None:
    entry = {
        "MessageBody": "€",
        "MessageAttributes": {
            "event_id": {"DataType": "String", "StringValue": "é"},
        },
    }
    # 3 bytes of body, 8 of name, 6 of data type, 2 of value.
    assert message_size(entry) == 19


@pytest.mark.parametrize(
    ("url", "region"),
    [
        ("https://sqs.eu-west-1.amazonaws.com/123456789012/q", "eu-west-1"),
        ("https://ap-south-1.queue.amazonaws.com/123456789012/q", "ap-south-1"),
        ("https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q", "cn-north-1"),
        ("http://127.0.0.1:5000/123456789012/q", ""),
    ],
)
def test_queue_region_read_from_url(url: str, region: str) -> None:
    destination = Destination(kind=Kind.SQS, stage=Stage.TEST, sqs_queue_url=url)
    assert queue_region(destination) == region


def client_error(code: str, status: int, message: str = "") -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "SendMessage")


QUEUE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders"


@pytest.fixture
def classified_destination(settings: Settings) -> Destination:
    identity = {
        "aws_access_key_id": "AKIAEXAMPLEKEYID0001",
        "aws_secret_access_key": "example-secret-access-key",
        "aws_profile": "",
        "sqs_endpoint_url": "",
    }
    settings.STAGE_IDENTITIES = {"TEST": identity, "PROD": identity}
    return Destination(
        kind=Kind.SQS, stage=Stage.PROD, sqs_queue_url=QUEUE_URL, sqs_fifo=False
    )


ERROR_TABLE = [
    # code, HTTP status, kind, permanent, blame
    ("AWS.SimpleQueueService.NonExistentQueue", 400, "queue_not_found", True, "d"),
    ("QueueDoesNotExist", 400, "queue_not_found", True, "d"),
    ("AccessDenied", 403, "access_denied", True, "d"),
    ("AccessDeniedException", 400, "access_denied", True, "d"),
    ("InvalidClientTokenId", 403, "access_denied", True, "d"),
    ("SignatureDoesNotMatch", 403, "access_denied", True, "d"),
    ("UnrecognizedClientException", 400, "access_denied", True, "d"),
    ("403", 403, "access_denied", True, "d"),
    ("KMS.AccessDeniedException", 400, "kms_access_denied", True, "d"),
    ("KmsAccessDenied", 400, "kms_access_denied", True, "d"),
    ("KMS.DisabledException", 400, "kms_access_denied", True, "d"),
    ("KmsDisabled", 400, "kms_access_denied", True, "d"),
    ("KMS.NotFoundException", 400, "kms_access_denied", True, "d"),
    ("KmsNotFound", 400, "kms_access_denied", True, "d"),
    ("KMS.InvalidStateException", 400, "kms_access_denied", True, "d"),
    ("KmsInvalidState", 400, "kms_access_denied", True, "d"),
    ("KmsInvalidKeyUsage", 400, "kms_access_denied", True, "d"),
    ("KmsOptInRequired", 400, "kms_access_denied", True, "d"),
    ("KmsThrottled", 400, "kms_throttled", False, "n"),
    ("InvalidMessageContents", 400, "invalid_message", True, "m"),
    ("MessageTooLong", 400, "too_large", True, "m"),
    ("InvalidParameterValue", 400, "invalid_parameter", True, "d"),
    ("MissingParameter", 400, "invalid_parameter", True, "d"),
    ("SomeNewClientError", 400, "invalid_parameter", True, "d"),
    ("Throttling", 400, "throttled", False, "n"),
    ("ThrottlingException", 400, "throttled", False, "n"),
    ("RequestThrottled", 403, "throttled", False, "n"),
    ("RequestThrottledException", 400, "throttled", False, "n"),
    ("OverLimit", 403, "throttled", False, "n"),
    ("InternalError", 500, "service_error", False, "n"),
    ("ServiceUnavailable", 503, "service_error", False, "n"),
    ("SomeNewServerError", 502, "service_error", False, "n"),
]
BLAMES = {"d": Blame.DESTINATION, "m": Blame.MESSAGE, "n": Blame.NONE}


@pytest.mark.parametrize(
    ("code", "status", "kind", "permanent", "blame"),
    ERROR_TABLE,
    ids=[row[0] for row in ERROR_TABLE],
)
def test_client_error_classified(
    classified_destination: Destination,
    code: str,
    status: int,
    kind: str,
    permanent: bool,
    blame: str,
) -> None:
    failure = classify_error(client_error(code, status), classified_destination)

    assert failure.kind == kind
    assert failure.permanent is permanent
    assert failure.blame == BLAMES[blame]
    assert QUEUE_URL in failure.message


def test_too_long_parameter_is_too_large(classified_destination: Destination) -> None:
    error = client_error(
        "InvalidParameterValue",
        400,
        "One or more parameters are invalid. Reason: Message must be shorter than "
        "262144 bytes.",
    )

    failure = classify_error(error, classified_destination)

    assert failure.kind == "too_large"
    assert failure.blame == Blame.MESSAGE


def test_access_denied_says_what_to_grant(
    classified_destination: Destination,
) -> None:
    failure = classify_error(client_error("AccessDenied", 403), classified_destination)

    assert "sqs:SendMessage" in failure.message
    assert "PROD" in failure.message


def test_kms_error_says_what_to_grant(classified_destination: Destination) -> None:
    failure = classify_error(
        client_error("KMS.AccessDeniedException", 400), classified_destination
    )

    assert "kms:GenerateDataKey" in failure.message
    assert "kms:Decrypt" in failure.message
    assert "PROD" in failure.message


def test_error_message_hides_credentials(classified_destination: Destination) -> None:
    error = client_error(
        "AccessDenied",
        403,
        "Key AKIAEXAMPLEKEYID0001 with secret example-secret-access-key is denied",
    )

    failure = classify_error(error, classified_destination)

    assert "AKIAEXAMPLEKEYID0001" not in failure.message
    assert "example-secret-access-key" not in failure.message
    assert "[redacted]" in failure.message


@pytest.mark.parametrize(
    ("error", "kind", "permanent"),
    [
        (
            EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
            "connection_failed",
            False,
        ),
        (ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), "timeout", False),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), "timeout", False),
        (NoCredentialsError(), "access_denied", True),
    ],
    ids=["endpoint-connection", "connect-timeout", "read-timeout", "no-credentials"],
)
def test_client_exception_classified(
    classified_destination: Destination,
    error: Exception,
    kind: str,
    permanent: bool,
) -> None:
    failure = classify_error(error, classified_destination)

    assert failure.kind == kind
    assert failure.permanent is permanent
    assert QUEUE_URL in failure.message
