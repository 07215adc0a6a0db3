"""The Pub/Sub transport, publishing over gRPC to the local peer and Google's emulator.

Tests that take `pubsub_peer` run against both servers. Tests that inject failures or
check limits run against the local peer only, because the emulator has neither.
"""

import json
import multiprocessing
import os
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from pytest_django import Settings

from delivery.models import Event
from delivery.peers.pubsub import PubSubPeer, start_pubsub_peer
from delivery.transports import (
    TRANSPORTS,
    Blame,
    Failure,
    OutgoingMessage,
    Result,
    Sent,
    transport_for,
)
from delivery.transports import pubsub as pubsub_module
from delivery.transports.pubsub import (
    MAX_ATTRIBUTE_KEY_BYTES,
    MAX_ATTRIBUTES,
    MAX_ORDERING_KEY_BYTES,
    MAX_REQUEST_BYTES,
    PubSubTransport,
    limit_problem,
    ordering_key,
    publish_request_size,
    publisher_for,
)
from destinations.models import Application, Destination, Kind, Stage

from .pubsub_fixtures import (
    PUBSUB_PROJECT,
    TEST_SERVICE_ACCOUNT,
    PubSubTarget,
    PubSubTopic,
    new_topic,
)

ORDER_FIXTURE = Path(__file__).parent / "fixtures" / "order_action_accept.json"
REGIONAL_ENDPOINT = "europe-west1-pubsub.googleapis.com:443"
GRANT = "roles/pubsub.publisher (permission pubsub.topics.publish)"

pytestmark = pytest.mark.django_db

PointStage = Callable[..., None]


@pytest.fixture
def application() -> Application:
    return Application.objects.create(name="Orders", slug="orders")


def pubsub_destination(
    application: Application,
    topic_id: str,
    *,
    ordering: bool = True,
    stage: str = Stage.TEST,
) -> Destination:
    return Destination.objects.create(
        application=application,
        stage=stage,
        kind=Kind.PUBSUB,
        name=f"topic {topic_id}",
        pubsub_project_id=PUBSUB_PROJECT,
        pubsub_topic_id=topic_id,
        pubsub_ordering=ordering,
        pubsub_endpoint=REGIONAL_ENDPOINT if ordering else "",
    )


def order_event() -> Event:
    """The sample ACCEPT order event, keyed by its order id."""
    envelope = json.loads(ORDER_FIXTURE.read_text())
    return Event(
        id=envelope["id"],
        type=envelope["type"],
        time=datetime.fromisoformat(envelope["time"]),
        data=envelope["data"],
        object_key=envelope["data"]["channel_order_id"],
    )


def outgoing(event: Event) -> OutgoingMessage:
    return OutgoingMessage(
        event_id=event.id,
        event_type=event.type,
        object_key=event.object_key,
        body=event.body(),
    )


def message(key: str, number: int, event_type: str = "UPDATE") -> OutgoingMessage:
    body = json.dumps({"id": f"{key}-{number}", "type": event_type}).encode()
    return OutgoingMessage(
        event_id=f"{key}-{number}", event_type=event_type, object_key=key, body=body
    )


def send(destination: Destination, *messages: OutgoingMessage) -> list[Result]:
    return PubSubTransport(destination).send(messages)


def failure(result: Result) -> Failure:
    assert isinstance(result, Failure), result
    return result


def sent(result: Result) -> Sent:
    assert isinstance(result, Sent), result
    return result


def publish_calls(peer: PubSubPeer, topic: PubSubTopic) -> list[grpc.StatusCode]:
    assert peer.state is not None
    return [
        call.code
        for call in peer.state.calls("Publish")
        if call.request.topic == topic.path
    ]


# Against both the local peer and Google's emulator.


def test_order_event_read_back_intact(
    pubsub_peer: PubSubTarget, pubsub_stage: PointStage, application: Application
) -> None:
    pubsub_stage(pubsub_peer.endpoint)
    topic = new_topic(pubsub_peer.endpoint, ordering=True)
    destination = pubsub_destination(application, topic.topic_id)
    event = order_event()

    [result] = send(destination, outgoing(event))
    [received] = topic.pull(1)

    assert received.message_id == sent(result).remote_message_id
    assert received.data == event.body()
    assert json.loads(received.data) == json.loads(ORDER_FIXTURE.read_text())
    assert dict(received.attributes) == {
        "event_id": "01jndg9q00szajyh54fp5wvwjv",
        "event_type": "ACCEPT",
    }
    assert received.ordering_key == "FKO-2025-000001-A"


def test_batch_results_follow_input_order(
    pubsub_peer: PubSubTarget, pubsub_stage: PointStage, application: Application
) -> None:
    pubsub_stage(pubsub_peer.endpoint)
    topic = new_topic(pubsub_peer.endpoint, ordering=True)
    destination = pubsub_destination(application, topic.topic_id)
    batch = [message(key, n) for n in range(5) for key in ("order-1", "order-2")]

    results = send(destination, *batch)
    received = topic.pull(len(batch))

    by_id = {m.message_id: m for m in received}
    for item, result in zip(batch, results, strict=True):
        assert by_id[sent(result).remote_message_id].data == item.body
    for key in ("order-1", "order-2"):
        events = [m.attributes["event_id"] for m in received if m.ordering_key == key]
        assert events == [f"{key}-{n}" for n in range(5)]


def test_unordered_destination_sends_no_key(
    pubsub_peer: PubSubTarget, pubsub_stage: PointStage, application: Application
) -> None:
    pubsub_stage(pubsub_peer.endpoint)
    topic = new_topic(pubsub_peer.endpoint, ordering=False)
    destination = pubsub_destination(application, topic.topic_id, ordering=False)

    [result] = send(destination, message("order-1", 1))
    [received] = topic.pull(1)

    assert received.message_id == sent(result).remote_message_id
    assert received.ordering_key == ""


def test_missing_topic_fails_permanently(
    pubsub_peer: PubSubTarget, pubsub_stage: PointStage, application: Application
) -> None:
    pubsub_stage(pubsub_peer.endpoint)
    destination = pubsub_destination(application, "missing-topic")

    result = failure(send(destination, message("order-1", 1))[0])

    assert result.kind == "topic_not_found"
    assert result.permanent
    assert result.blame == Blame.DESTINATION
    assert f"projects/{PUBSUB_PROJECT}/topics/missing-topic" in result.message
    assert TEST_SERVICE_ACCOUNT in result.message
    assert GRANT in result.message


# The local peer only.


def test_permission_denied_fails_permanently(
    local_pubsub_peer: PubSubPeer, pubsub_stage: PointStage, application: Application
) -> None:
    pubsub_stage(local_pubsub_peer.endpoint)
    topic = new_topic(local_pubsub_peer.endpoint)
    destination = pubsub_destination(application, topic.topic_id)
    local_pubsub_peer.fail_next_publishes(1, grpc.StatusCode.PERMISSION_DENIED)

    result = failure(send(destination, message("order-1", 1))[0])

    assert result.kind == "access_denied"
    assert result.permanent
    assert result.blame == Blame.DESTINATION
    assert topic.path in result.message
    assert TEST_SERVICE_ACCOUNT in result.message
    assert GRANT in result.message


def test_unauthenticated_fails_permanently(
    local_pubsub_peer: PubSubPeer, pubsub_stage: PointStage, application: Application
) -> None:
    pubsub_stage(local_pubsub_peer.endpoint)
    topic = new_topic(local_pubsub_peer.endpoint)
    destination = pubsub_destination(application, topic.topic_id)
    local_pubsub_peer.fail_next_publishes(1, grpc.StatusCode.UNAUTHENTICATED)

    result = failure(send(destination, message("order-1", 1))[0])

    assert result.kind == "unauthenticated"
    assert result.permanent
    assert result.blame == Blame.DESTINATION
    assert topic.path in result.message
    assert TEST_SERVICE_ACCOUNT in result.message


@pytest.mark.parametrize(
    ("details", "blame"),
    [
        ("Invalid [topics] name: (name=projects/p/topics/t)", Blame.DESTINATION),
        ("Message 0 has an attribute key of 300 bytes.", Blame.MESSAGE),
        ("Invalid data in message: Message failed schema validation.", Blame.MESSAGE),
    ],
    ids=["topic", "attribute", "schema"],
)
def test_invalid_argument_blames_its_subject(
    local_pubsub_peer: PubSubPeer,
    pubsub_stage: PointStage,
    application: Application,
    details: str,
    blame: Blame,
) -> None:
    pubsub_stage(local_pubsub_peer.endpoint)
    topic = new_topic(local_pubsub_peer.endpoint)
    destination = pubsub_destination(application, topic.topic_id)
    local_pubsub_peer.fail_next_publishes(1, grpc.StatusCode.INVALID_ARGUMENT, details)

    result = failure(send(destination, message("order-1", 1))[0])

    assert result.kind == "invalid_argument"
    assert result.permanent
    assert result.blame == blame
    assert details in result.message
    assert topic.path in result.message


def test_unavailable_key_resumes_in_order(
    local_pubsub_peer: PubSubPeer, pubsub_stage: PointStage, application: Application
) -> None:
    pubsub_stage(local_pubsub_peer.endpoint)
    topic = new_topic(local_pubsub_peer.endpoint, ordering=True)
    destination = pubsub_destination(application, topic.topic_id)
    local_pubsub_peer.fail_next_publishes(1, grpc.StatusCode.UNAVAILABLE)

    first = failure(send(destination, message("order-1", 1))[0])
    retried = send(destination, message("order-1", 1), message("order-1", 2))
    received = topic.pull(2)

    assert first.kind == "unavailable"
    assert not first.permanent
    assert first.blame == Blame.NONE
    assert all(isinstance(result, Sent) for result in retried)
    assert [m.attributes["event_id"] for m in received] == ["order-1-1", "order-1-2"]
    assert [m.ordering_key for m in received] == ["order-1", "order-1"]
    assert publish_calls(local_pubsub_peer, topic) == [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.OK,
    ]


def test_failed_batch_of_one_key_all_transient(
    local_pubsub_peer: PubSubPeer, pubsub_stage: PointStage, application: Application
) -> None:
    pubsub_stage(local_pubsub_peer.endpoint)
    topic = new_topic(local_pubsub_peer.endpoint, ordering=True)
    destination = pubsub_destination(application, topic.topic_id)
    batch = [message("order-1", n) for n in range(3)]
    local_pubsub_peer.fail_next_publishes(1, grpc.StatusCode.UNAVAILABLE)

    failed = send(destination, *batch)
    retried = send(destination, *batch)
    received = topic.pull(3)

    assert all(not failure(result).permanent for result in failed)
    assert all(isinstance(result, Sent) for result in retried)
    assert [m.data for m in received] == [item.body for item in batch]


def test_client_error_stops_its_key(
    local_pubsub_peer: PubSubPeer,
    pubsub_stage: PointStage,
    application: Application,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pubsub_stage(local_pubsub_peer.endpoint)
    topic = new_topic(local_pubsub_peer.endpoint, ordering=True)
    destination = pubsub_destination(application, topic.topic_id)
    client = publisher_for(destination)
    real_publish = client.publish
    handed_over = []

    def publish(*args: Any, **kwargs: Any) -> Any:
        # The client rejects one message before sending anything.
        if kwargs["event_id"] == "order-1-2":
            raise RuntimeError("the client failed")
        handed_over.append(kwargs["event_id"])
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(client, "publish", publish)
    batch = [message("order-1", 1), message("order-1", 2), message("order-1", 3)]

    results = send(destination, *batch, message("order-2", 1))
    received = topic.pull(2)

    assert isinstance(results[0], Sent)
    assert failure(results[1]).kind == "internal_error"
    assert failure(results[2]) == failure(results[1])
    assert isinstance(results[3], Sent)
    assert handed_over == ["order-1-1", "order-2-1"]
    assert sorted(m.attributes["event_id"] for m in received) == [
        "order-1-1",
        "order-2-1",
    ]


def test_unordered_publish_retries_unavailable(
    local_pubsub_peer: PubSubPeer, pubsub_stage: PointStage, application: Application
) -> None:
    pubsub_stage(local_pubsub_peer.endpoint)
    topic = new_topic(local_pubsub_peer.endpoint, ordering=False)
    destination = pubsub_destination(application, topic.topic_id, ordering=False)
    local_pubsub_peer.fail_next_publishes(1, grpc.StatusCode.UNAVAILABLE)

    [result] = send(destination, message("order-1", 1))

    assert isinstance(result, Sent)
    assert publish_calls(local_pubsub_peer, topic) == [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.OK,
    ]


def test_unordered_retry_stops_at_timeout(
    local_pubsub_peer: PubSubPeer,
    pubsub_stage: PointStage,
    application: Application,
    settings: Settings,
) -> None:
    settings.PUBSUB_TIMEOUT = 1.0
    pubsub_stage(local_pubsub_peer.endpoint)
    topic = new_topic(local_pubsub_peer.endpoint, ordering=False)
    destination = pubsub_destination(application, topic.topic_id, ordering=False)
    local_pubsub_peer.fail_next_publishes(10_000, grpc.StatusCode.UNAVAILABLE)

    result = failure(send(destination, message("order-1", 1))[0])

    assert result.kind == "unavailable"
    assert not result.permanent
    assert topic.path in result.message


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP listener on 127.0.0.1 that accepts connections and never replies."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    stopped = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stopped.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stopped.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


@pytest.mark.parametrize("ordering", [True, False], ids=["ordered", "unordered"])
def test_silent_server_times_out(
    silent_server: str,
    pubsub_stage: PointStage,
    application: Application,
    settings: Settings,
    ordering: bool,
) -> None:
    settings.PUBSUB_TIMEOUT = 1.0
    pubsub_stage(silent_server)
    destination = pubsub_destination(application, "silent-topic", ordering=ordering)

    result = failure(send(destination, message("order-1", 1))[0])

    assert result.kind == "timeout"
    assert not result.permanent
    assert "timed out after 1 s" in result.message


def test_too_large_message_not_published(
    local_pubsub_peer: PubSubPeer, pubsub_stage: PointStage, application: Application
) -> None:
    pubsub_stage(local_pubsub_peer.endpoint)
    topic = new_topic(local_pubsub_peer.endpoint)
    destination = pubsub_destination(application, topic.topic_id)
    large = OutgoingMessage("large-1", "UPDATE", "order-1", b"x" * MAX_REQUEST_BYTES)

    results = send(destination, large, message("order-2", 1))

    too_large = failure(results[0])
    assert too_large.kind == "too_large"
    assert too_large.permanent
    assert too_large.blame == Blame.MESSAGE
    assert "10,000,000" in too_large.message
    assert isinstance(results[1], Sent)
    assert publish_calls(local_pubsub_peer, topic) == [grpc.StatusCode.OK]


def test_too_long_attribute_not_published(
    local_pubsub_peer: PubSubPeer, pubsub_stage: PointStage, application: Application
) -> None:
    pubsub_stage(local_pubsub_peer.endpoint)
    topic = new_topic(local_pubsub_peer.endpoint)
    destination = pubsub_destination(application, topic.topic_id)
    long_type = OutgoingMessage("event-1", "T" * 1025, "order-1", b"{}")

    result = failure(send(destination, long_type)[0])

    assert result.kind == "too_large"
    assert result.blame == Blame.MESSAGE
    assert "event_type" in result.message
    assert "1,025 bytes" in result.message
    assert publish_calls(local_pubsub_peer, topic) == []


def test_limit_check_rejects_too_many_attributes() -> None:
    attributes = {f"a{n}": "v" for n in range(MAX_ATTRIBUTES + 1)}

    problem = limit_problem("projects/p/topics/t", b"{}", attributes)

    assert problem is not None
    assert "101 attributes" in problem


def test_limit_check_rejects_long_attribute_key() -> None:
    attributes = {"k" * (MAX_ATTRIBUTE_KEY_BYTES + 1): "v"}

    problem = limit_problem("projects/p/topics/t", b"{}", attributes)

    assert problem is not None
    assert "257 bytes" in problem


def test_limit_check_accepts_maximum_values() -> None:
    attributes = {f"a{n}": "v" for n in range(MAX_ATTRIBUTES - 1)}
    attributes["k" * MAX_ATTRIBUTE_KEY_BYTES] = "v" * 1024

    problem = limit_problem(
        "projects/p/topics/t", b"{}", attributes, "o" * MAX_ORDERING_KEY_BYTES
    )

    assert problem is None


def test_limit_check_exact_request_limit() -> None:
    topic = "projects/p/topics/t"
    attributes = {"event_id": "e" * 40, "event_type": "ORDER_ACTION_ACCEPT"}
    size = MAX_REQUEST_BYTES - 200
    while publish_request_size(topic, b"x" * size, attributes, "key") <= (
        MAX_REQUEST_BYTES
    ):
        size += 1

    largest = limit_problem(topic, b"x" * (size - 1), attributes, "key")
    over = limit_problem(topic, b"x" * size, attributes, "key")

    assert largest is None
    assert over is not None
    assert f"{MAX_REQUEST_BYTES + 1:,} bytes" in over


def test_long_object_key_hashed_to_ordering_key() -> None:
    long_key = "é" * 513

    hashed = ordering_key(long_key)

    assert hashed.startswith("sha256-")
    assert len(hashed.encode()) <= MAX_ORDERING_KEY_BYTES
    assert ordering_key(long_key) == hashed
    assert ordering_key("FKO-2025-000001-A") == "FKO-2025-000001-A"


def test_account_read_from_key_file(
    pubsub_peer: PubSubTarget,
    pubsub_stage: PointStage,
    application: Application,
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "key.json"
    key_file.write_text(
        json.dumps(
            {
                "type": "service_account",
                "client_email": "from-key@platform-project.iam.gserviceaccount.com",
            }
        )
    )
    pubsub_stage(
        pubsub_peer.endpoint, gcp_service_account="", gcp_credentials_file=str(key_file)
    )
    destination = pubsub_destination(application, "missing-topic")

    result = failure(send(destination, message("order-1", 1))[0])

    assert "from-key@platform-project.iam.gserviceaccount.com" in result.message


def test_account_defaults_to_stage_wording(
    local_pubsub_peer: PubSubPeer, pubsub_stage: PointStage, application: Application
) -> None:
    pubsub_stage(local_pubsub_peer.endpoint, gcp_service_account="")
    destination = pubsub_destination(application, "missing-topic")

    result = failure(send(destination, message("order-1", 1))[0])

    assert "the platform's TEST service account" in result.message


def test_stages_publish_to_own_emulator_hosts(
    local_pubsub_peer: PubSubPeer,
    settings: Settings,
    application: Application,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    prod_peer = start_pubsub_peer("127.0.0.1", 0)
    try:
        test_topic = new_topic(local_pubsub_peer.endpoint)
        prod_topic = new_topic(prod_peer.endpoint)
        identities = {
            stage: dict(values) for stage, values in settings.STAGE_IDENTITIES.items()
        }
        identities["TEST"]["pubsub_emulator_host"] = local_pubsub_peer.endpoint
        identities["PROD"]["pubsub_emulator_host"] = prod_peer.endpoint
        settings.STAGE_IDENTITIES = identities
        test_destination = pubsub_destination(application, test_topic.topic_id)
        prod_destination = pubsub_destination(
            application, prod_topic.topic_id, stage=Stage.PROD
        )

        [test_result] = send(test_destination, message("order-1", 1))
        [prod_result] = send(prod_destination, message("order-1", 2))
        test_received = test_topic.pull(1)
        prod_received = prod_topic.pull(1)
    finally:
        prod_peer.stop()

    assert isinstance(test_result, Sent)
    assert isinstance(prod_result, Sent)
    assert test_received[0].attributes["event_id"] == "order-1-1"
    assert prod_received[0].attributes["event_id"] == "order-1-2"
    assert "PUBSUB_EMULATOR_HOST" not in os.environ


def test_transport_registered_for_pubsub(application: Application) -> None:
    destination = pubsub_destination(application, "registered-topic")

    assert TRANSPORTS[Kind.PUBSUB] is PubSubTransport
    assert isinstance(transport_for(destination), PubSubTransport)


def test_publisher_reused_within_process(
    local_pubsub_peer: PubSubPeer, pubsub_stage: PointStage, application: Application
) -> None:
    pubsub_stage(local_pubsub_peer.endpoint)
    ordered = pubsub_destination(application, "reused-topic")
    unordered = pubsub_destination(application, "other-topic", ordering=False)

    assert publisher_for(ordered) is publisher_for(ordered)
    assert publisher_for(ordered) is not publisher_for(unordered)


def test_publisher_batch_latency_setting(
    local_pubsub_peer: PubSubPeer,
    pubsub_stage: PointStage,
    application: Application,
    settings: Settings,
) -> None:
    pubsub_stage(local_pubsub_peer.endpoint)
    settings.PUBSUB_BATCH_LATENCY = 0.005
    destination = pubsub_destination(application, "latency-topic")
    pubsub_module._clients.clear()

    client = publisher_for(destination)

    assert client.batch_settings.max_latency == 0.005
    pubsub_module._clients.clear()


def _send_in_child(destination: Destination, parent_client: Any, results: Any) -> None:
    """Run in a forked child: report whether the cache handed out the parent's
    client, and the result of one send."""
    child_client = publisher_for(destination)
    [result] = PubSubTransport(destination).send([message("order-1", 2)])
    results.put((child_client is parent_client, result))


# The parent runs gRPC threads, which Python warns about at fork. The child only
# builds its own client, which is what this test checks.
@pytest.mark.filterwarnings("ignore:This process .* multi-threaded:DeprecationWarning")
def test_forked_child_gets_new_publisher(
    local_pubsub_peer: PubSubPeer, pubsub_stage: PointStage, application: Application
) -> None:
    pubsub_stage(local_pubsub_peer.endpoint)
    topic = new_topic(local_pubsub_peer.endpoint, ordering=True)
    destination = pubsub_destination(application, topic.topic_id)
    [parent_result] = send(destination, message("order-1", 1))
    parent_client = publisher_for(destination)

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(
        target=_send_in_child, args=(destination, parent_client, results)
    )
    child.start()
    shared_client, child_result = results.get(timeout=60)
    child.join(timeout=60)
    received = topic.pull(2)

    assert isinstance(parent_result, Sent)
    assert child.exitcode == 0
    assert shared_client is False
    assert isinstance(child_result, Sent)
    assert [m.attributes["event_id"] for m in received] == ["order-1-1", "order-1-2"]
    assert publisher_for(destination) is parent_client
