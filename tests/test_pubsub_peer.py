"""The local Pub/Sub peer, driven by google-cloud-pubsub over gRPC.

Tests that take `pubsub_peer` run against the local peer and against Google's
emulator, so the peer is held to the emulator's behaviour. Limits and the failure
switch exist only in the local peer.
"""

import threading
import uuid
from collections.abc import Iterator

import grpc
import pytest
from google.api_core import exceptions
from google.cloud import pubsub_v1
from google.pubsub_v1 import PublisherClient as GapicPublisherClient
from google.pubsub_v1 import types

from delivery.peers.pubsub import (
    MAX_REQUEST_BYTES,
    PubSubPeer,
    peer_environment,
    publisher_client,
    start_pubsub_peer,
)

from .pubsub_fixtures import PUBSUB_PROJECT, PubSubTarget, PubSubTopic, new_topic

# gRPC reads these, and a proxy would take the client's requests away from 127.0.0.1.
PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy")


def set_emulator_host(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", endpoint)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def emulator_host(
    pubsub_peer: PubSubTarget, monkeypatch: pytest.MonkeyPatch
) -> PubSubTarget:
    """Point clients built in the test at the server through PUBSUB_EMULATOR_HOST."""
    set_emulator_host(monkeypatch, pubsub_peer.endpoint)
    return pubsub_peer


@pytest.fixture
def local_emulator_host(
    local_pubsub_peer: PubSubPeer, monkeypatch: pytest.MonkeyPatch
) -> PubSubPeer:
    set_emulator_host(monkeypatch, local_pubsub_peer.endpoint)
    return local_pubsub_peer


@pytest.fixture
def publisher() -> Iterator[pubsub_v1.PublisherClient]:
    """A publisher built the ordinary way; it reads PUBSUB_EMULATOR_HOST."""
    options = pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
    client = pubsub_v1.PublisherClient(publisher_options=options)
    yield client
    client.stop()
    client.transport.close()


def publish(
    client: pubsub_v1.PublisherClient, topic: str, data: bytes, **kwargs: str
) -> str:
    """Publish one message with no client retry and return its message id."""
    return str(client.publish(topic, data, retry=None, **kwargs).result(timeout=30))


def published_topic(peer: PubSubPeer, topic: PubSubTopic) -> list[bytes]:
    assert peer.state is not None
    return [message.data for message in peer.state.published(topic.path)]


# Against both the local peer and Google's emulator.


def test_created_topic_found_by_name(
    emulator_host: PubSubTarget, publisher: pubsub_v1.PublisherClient
) -> None:
    name = f"projects/{PUBSUB_PROJECT}/topics/created-{uuid.uuid4().hex}"

    created = publisher.create_topic(name=name)
    found = publisher.get_topic(topic=name)

    assert created.name == name
    assert found.name == name


def test_creating_existing_topic_fails(
    emulator_host: PubSubTarget, publisher: pubsub_v1.PublisherClient
) -> None:
    topic = new_topic(emulator_host.endpoint)

    with pytest.raises(exceptions.AlreadyExists):
        publisher.create_topic(name=topic.path)


def test_publish_keeps_data_attributes_and_key(
    emulator_host: PubSubTarget, publisher: pubsub_v1.PublisherClient
) -> None:
    topic = new_topic(emulator_host.endpoint)

    message_id = publish(
        publisher,
        topic.path,
        b'{"id":"1"}',
        ordering_key="order-1",
        event_id="1",
        event_type="ACCEPT",
    )
    [message] = topic.pull(1)

    assert message.data == b'{"id":"1"}'
    assert dict(message.attributes) == {"event_id": "1", "event_type": "ACCEPT"}
    assert message.ordering_key == "order-1"
    assert message.message_id == message_id
    assert message.publish_time.year >= 2025


def test_message_ids_are_unique(
    emulator_host: PubSubTarget, publisher: pubsub_v1.PublisherClient
) -> None:
    topic = new_topic(emulator_host.endpoint)

    futures = [publisher.publish(topic.path, b"x%d" % n) for n in range(20)]
    message_ids = [future.result(timeout=30) for future in futures]

    assert len(set(message_ids)) == 20


def test_ordered_subscription_keeps_key_order(
    emulator_host: PubSubTarget, publisher: pubsub_v1.PublisherClient
) -> None:
    topic = new_topic(emulator_host.endpoint, ordering=True)
    futures = [
        publisher.publish(topic.path, f"{key}-{n}".encode(), ordering_key=key)
        for n in range(10)
        for key in ("order-a", "order-b", "order-c")
    ]
    for future in futures:
        future.result(timeout=30)

    received = topic.pull(30)

    for key in ("order-a", "order-b", "order-c"):
        data = [m.data.decode() for m in received if m.ordering_key == key]
        assert data == [f"{key}-{n}" for n in range(10)]


def test_acknowledged_message_not_delivered_again(
    emulator_host: PubSubTarget, publisher: pubsub_v1.PublisherClient
) -> None:
    topic = new_topic(emulator_host.endpoint)
    publish(publisher, topic.path, b"first")
    [first] = topic.pull(1)

    publish(publisher, topic.path, b"second")
    [second] = topic.pull(1)

    assert first.data == b"first"
    assert second.data == b"second"


def test_zero_ack_deadline_redelivers_message(
    emulator_host: PubSubTarget, publisher: pubsub_v1.PublisherClient
) -> None:
    topic = new_topic(emulator_host.endpoint)
    publish(publisher, topic.path, b"again")

    with pubsub_v1.SubscriberClient() as subscriber:
        first = subscriber.pull(subscription=topic.subscription, max_messages=1)
        [leased] = first.received_messages
        subscriber.modify_ack_deadline(
            subscription=topic.subscription,
            ack_ids=[leased.ack_id],
            ack_deadline_seconds=0,
        )
    [redelivered] = topic.pull(1)

    assert leased.message.data == b"again"
    assert redelivered.message_id == leased.message.message_id


def test_publish_to_missing_topic_not_found(
    emulator_host: PubSubTarget, publisher: pubsub_v1.PublisherClient
) -> None:
    missing = f"projects/{PUBSUB_PROJECT}/topics/missing-topic"

    with pytest.raises(exceptions.NotFound):
        publish(publisher, missing, b"lost")


def test_missing_subscription_not_found(emulator_host: PubSubTarget) -> None:
    missing = f"projects/{PUBSUB_PROJECT}/subscriptions/missing-subscription"

    with (
        pubsub_v1.SubscriberClient() as subscriber,
        pytest.raises(exceptions.NotFound),
    ):
        subscriber.get_subscription(subscription=missing)


def test_subscription_to_missing_topic_not_found(emulator_host: PubSubTarget) -> None:
    request = {
        "name": f"projects/{PUBSUB_PROJECT}/subscriptions/orphan-subscription",
        "topic": f"projects/{PUBSUB_PROJECT}/topics/missing-topic",
    }

    with (
        pubsub_v1.SubscriberClient() as subscriber,
        pytest.raises(exceptions.NotFound),
    ):
        subscriber.create_subscription(request=request)


# The local peer only.


def test_not_found_names_resource_like_pubsub(
    local_emulator_host: PubSubPeer, publisher: pubsub_v1.PublisherClient
) -> None:
    missing = f"projects/{PUBSUB_PROJECT}/topics/missing-topic"

    with pytest.raises(exceptions.NotFound) as raised:
        publish(publisher, missing, b"lost")

    assert raised.value.message == "Resource not found (resource=missing-topic)."


def test_invalid_topic_name_rejected(
    local_emulator_host: PubSubPeer, publisher: pubsub_v1.PublisherClient
) -> None:
    with pytest.raises(exceptions.InvalidArgument) as raised:
        publisher.create_topic(name=f"projects/{PUBSUB_PROJECT}/topics/goog-reserved")

    assert "Invalid [topics] name" in str(raised.value.message)


@pytest.mark.parametrize(
    ("attributes", "ordering_key", "expected"),
    [
        ({f"a{n}": "v" for n in range(101)}, "", "101 attributes"),
        ({"k" * 257: "v"}, "", "attribute key of 257 bytes"),
        ({"é" * 129: "v"}, "", "attribute key of 258 bytes"),
        ({"a": "v" * 1025}, "", "value of 1025 bytes"),
        ({}, "o" * 1025, "ordering key of 1025 bytes"),
    ],
    ids=["attributes", "key", "key-utf8", "value", "ordering-key"],
)
def test_limit_rejected_as_invalid_argument(
    local_emulator_host: PubSubPeer,
    publisher: pubsub_v1.PublisherClient,
    attributes: dict[str, str],
    ordering_key: str,
    expected: str,
) -> None:
    topic = new_topic(local_emulator_host.endpoint)

    with pytest.raises(exceptions.InvalidArgument) as raised:
        publish(publisher, topic.path, b"x", ordering_key=ordering_key, **attributes)

    assert expected in str(raised.value.message)
    assert published_topic(local_emulator_host, topic) == []


def test_limits_accept_maximum_values(
    local_emulator_host: PubSubPeer, publisher: pubsub_v1.PublisherClient
) -> None:
    topic = new_topic(local_emulator_host.endpoint)
    attributes = {f"a{n}": "v" for n in range(99)}
    attributes["k" * 256] = "v" * 1024

    publish(publisher, topic.path, b"x", ordering_key="o" * 1024, **attributes)

    assert published_topic(local_emulator_host, topic) == [b"x"]


def test_oversized_request_rejected(local_emulator_host: PubSubPeer) -> None:
    topic = new_topic(local_emulator_host.endpoint)
    # The GAPIC client has no size check of its own, unlike PublisherClient.publish.
    client = GapicPublisherClient()
    message = types.PubsubMessage(data=b"x" * MAX_REQUEST_BYTES)

    with pytest.raises(exceptions.InvalidArgument) as raised:
        client.publish(topic=topic.path, messages=[message], retry=None)

    assert "exceeds the limit: 10000000 bytes" in str(raised.value.message)
    assert published_topic(local_emulator_host, topic) == []


def test_request_at_size_limit_accepted(local_emulator_host: PubSubPeer) -> None:
    topic = new_topic(local_emulator_host.endpoint)
    client = GapicPublisherClient()
    overhead = types.PublishRequest.pb(
        types.PublishRequest(
            topic=topic.path, messages=[types.PubsubMessage(data=b"x" * 9_999_000)]
        )
    ).ByteSize()
    data = b"x" * (9_999_000 + MAX_REQUEST_BYTES - overhead)

    response = client.publish(
        topic=topic.path, messages=[types.PubsubMessage(data=data)], retry=None
    )

    assert len(response.message_ids) == 1
    assert len(published_topic(local_emulator_host, topic)[0]) == len(data)


def test_empty_message_rejected(
    local_emulator_host: PubSubPeer, publisher: pubsub_v1.PublisherClient
) -> None:
    topic = new_topic(local_emulator_host.endpoint)

    with pytest.raises(exceptions.InvalidArgument) as raised:
        publish(publisher, topic.path, b"")

    assert "empty" in str(raised.value.message)


def test_fail_switch_fails_next_publishes(
    local_emulator_host: PubSubPeer, publisher: pubsub_v1.PublisherClient
) -> None:
    topic = new_topic(local_emulator_host.endpoint)
    local_emulator_host.fail_next_publishes(2, grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(exceptions.ServiceUnavailable):
        publish(publisher, topic.path, b"one")
    with pytest.raises(exceptions.ServiceUnavailable):
        publish(publisher, topic.path, b"two")
    publish(publisher, topic.path, b"three")

    assert published_topic(local_emulator_host, topic) == [b"three"]


def test_fail_switch_uses_chosen_code_and_details(
    local_emulator_host: PubSubPeer, publisher: pubsub_v1.PublisherClient
) -> None:
    topic = new_topic(local_emulator_host.endpoint)
    local_emulator_host.fail_next_publishes(
        1, grpc.StatusCode.PERMISSION_DENIED, "No pubsub.topics.publish."
    )

    with pytest.raises(exceptions.PermissionDenied) as raised:
        publish(publisher, topic.path, b"denied")

    assert raised.value.message == "No pubsub.topics.publish."


def test_calls_recorded_with_status(
    local_emulator_host: PubSubPeer, publisher: pubsub_v1.PublisherClient
) -> None:
    topic = new_topic(local_emulator_host.endpoint)
    local_emulator_host.fail_next_publishes(1, grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(exceptions.ServiceUnavailable):
        publish(publisher, topic.path, b"one")
    publish(publisher, topic.path, b"two")
    assert local_emulator_host.state is not None

    calls = [
        call
        for call in local_emulator_host.state.calls("Publish")
        if call.request.topic == topic.path
    ]

    assert [call.code for call in calls] == [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.OK,
    ]
    assert calls[1].request.messages[0].data == b"two"


def test_concurrent_publishes_all_recorded(local_pubsub_peer: PubSubPeer) -> None:
    topic = new_topic(local_pubsub_peer.endpoint, ordering=False)
    message_ids: list[str] = []
    lock = threading.Lock()

    def publish_many(thread: int) -> None:
        client = publisher_client(local_pubsub_peer.endpoint)
        futures = [
            client.publish(topic.path, f"{thread}-{n}".encode()) for n in range(50)
        ]
        ids = [future.result(timeout=30) for future in futures]
        client.stop()
        with lock:
            message_ids.extend(ids)

    threads = [threading.Thread(target=publish_many, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(set(message_ids)) == 400
    assert len(published_topic(local_pubsub_peer, topic)) == 400


def test_peer_in_child_process_obeys_admin_switch() -> None:
    peer = start_pubsub_peer("127.0.0.1", 0, in_process=False)
    try:
        topic = new_topic(peer.endpoint)
        client = publisher_client(peer.endpoint)
        peer.fail_next_publishes(1, grpc.StatusCode.RESOURCE_EXHAUSTED)

        with pytest.raises(exceptions.ResourceExhausted):
            client.publish(topic.path, b"one", retry=None).result(timeout=30)
        message_id = client.publish(topic.path, b"two").result(timeout=30)
        [message] = topic.pull(1)
        client.stop()
    finally:
        peer.stop()

    assert peer.state is None
    assert message.data == b"two"
    assert message.message_id == message_id


def test_peer_environment_points_both_stages() -> None:
    environment = peer_environment("127.0.0.1:8085")

    assert environment["TEST_PUBSUB_EMULATOR_HOST"] == "127.0.0.1:8085"
    assert environment["PROD_PUBSUB_EMULATOR_HOST"] == "127.0.0.1:8085"
    assert environment["PUBSUB_EMULATOR_HOST"] == "127.0.0.1:8085"
