"""The Service Bus peer, driven over AMQP by the real azure-servicebus client."""

import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus.exceptions import (
    MessageSizeExceededError,
    MessagingEntityNotFoundError,
    OperationTimeoutError,
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
    ServiceBusConnectionError,
    ServiceBusError,
    ServiceBusServerBusyError,
)
from django.conf import settings

from delivery.peers.servicebus import (
    DEFAULT_KEY_NAME,
    SERVER_BUSY,
    ServiceBusPeer,
    SharedAccessPolicy,
    generate_key,
    start_servicebus_peer,
)
from delivery.peers.servicebus.codec import decode_transfer
from delivery.peers.servicebus.sas import (
    TokenRejected,
    make_token,
    verify_token,
)

from .servicebus_fixtures import unique_entity_name

COMMAND_START_SECONDS = 30.0


def send(
    connection_string: str,
    entity: str,
    messages: ServiceBusMessage | Sequence[ServiceBusMessage],
    *,
    topic: bool = False,
) -> None:
    """Send with a new client that does not retry, as a sender opening cold does."""
    with ServiceBusClient.from_connection_string(
        connection_string, retry_total=0
    ) as client:
        if topic:
            sender = client.get_topic_sender(topic_name=entity)
        else:
            sender = client.get_queue_sender(queue_name=entity)
        with sender:
            sender.send_messages(messages, timeout=10)


def condition(error: BaseException) -> str:
    inner = getattr(error, "inner_exception", None)
    value = getattr(inner, "condition", b"")
    return value.decode() if isinstance(value, bytes) else str(value)


def test_queue_send_records_every_property(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    message = ServiceBusMessage(
        b'{"id": "evt-1"}',
        message_id="evt-1",
        session_id="order-7",
        partition_key="order-7",
        content_type="application/json",
        subject="ACCEPT",
        correlation_id="corr-1",
        application_properties={"event_type": "ACCEPT", "attempt": 2},
    )

    send(servicebus.connection_string(), queue, message)

    [recorded] = servicebus.messages(queue)
    assert recorded.entity == queue
    assert recorded.message_id == "evt-1"
    assert recorded.session_id == "order-7"
    assert recorded.partition_key == "order-7"
    assert recorded.content_type == "application/json"
    assert recorded.subject == "ACCEPT"
    assert recorded.correlation_id == "corr-1"
    assert recorded.application_properties == {"event_type": "ACCEPT", "attempt": 2}
    assert recorded.body == b'{"id": "evt-1"}'
    assert recorded.batched is False


def test_topic_send_is_recorded(servicebus: ServiceBusPeer) -> None:
    topic = unique_entity_name("events")
    servicebus.add_topic(topic)

    send(
        servicebus.connection_string(),
        topic,
        ServiceBusMessage(b"hello", message_id="t-1"),
        topic=True,
    )

    [recorded] = servicebus.messages(topic)
    assert recorded.message_id == "t-1"
    assert recorded.body == b"hello"
    assert servicebus.entity(topic) is not None
    assert str(servicebus.entity(topic).type) == "topic"  # type: ignore[union-attr]


def test_entity_names_ignore_case(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("Orders")
    servicebus.add_queue(queue)

    send(servicebus.connection_string(), queue.lower(), ServiceBusMessage(b"x"))

    assert len(servicebus.messages(queue)) == 1


def test_batch_recorded_as_separate_messages(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    messages = [
        ServiceBusMessage(f"body {n}".encode(), message_id=f"m-{n}", subject=f"s{n}")
        for n in range(3)
    ]

    send(servicebus.connection_string(), queue, messages)

    recorded = servicebus.messages(queue)
    assert [m.message_id for m in recorded] == ["m-0", "m-1", "m-2"]
    assert [m.body for m in recorded] == [b"body 0", b"body 1", b"body 2"]
    assert [m.subject for m in recorded] == ["s0", "s1", "s2"]
    assert all(m.batched for m in recorded)
    assert len({m.transfer_size for m in recorded}) == 1


def test_wrong_key_rejected_with_401(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    connection_string = servicebus.connection_string(key=generate_key())

    with pytest.raises(ServiceBusAuthenticationError):
        send(connection_string, queue, ServiceBusMessage(b"x"))

    [request] = servicebus.token_requests
    assert request.status_code == 401
    assert request.key_name == DEFAULT_KEY_NAME
    assert servicebus.messages(queue) == []


def test_wrong_key_name_rejected_with_401(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    connection_string = servicebus.connection_string(key_name="SendOnly")

    with pytest.raises(ServiceBusAuthenticationError):
        send(connection_string, queue, ServiceBusMessage(b"x"))

    [request] = servicebus.token_requests
    assert request.status_code == 401
    assert request.key_name == "SendOnly"
    assert servicebus.messages(queue) == []


def test_right_key_accepted_with_202(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)

    send(servicebus.connection_string(), queue, ServiceBusMessage(b"x"))

    [request] = servicebus.token_requests
    assert request.status_code == 202
    assert request.audience == f"{servicebus.endpoint}/{queue}"


def test_shared_access_signature_connection_string_accepted(
    servicebus: ServiceBusPeer,
) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    policy = SharedAccessPolicy(servicebus.key_name, servicebus.key)
    # A token for the whole namespace covers each of its entities.
    token = make_token(f"{servicebus.endpoint}/", policy)
    connection_string = (
        f"Endpoint={servicebus.endpoint};SharedAccessSignature={token};"
        "UseDevelopmentEmulator=true"
    )

    send(connection_string, queue, ServiceBusMessage(b"x", message_id="sas-1"))

    assert [m.message_id for m in servicebus.messages(queue)] == ["sas-1"]


def test_listen_only_policy_cannot_send(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    key = generate_key()
    servicebus.add_policy("ListenOnly", key, rights=["Listen"])
    connection_string = servicebus.connection_string(key_name="ListenOnly", key=key)

    with pytest.raises(ServiceBusAuthorizationError) as raised:
        send(connection_string, queue, ServiceBusMessage(b"x"))

    assert condition(raised.value) == "amqp:unauthorized-access"
    assert "'Send' claim(s) are required" in str(raised.value)
    assert servicebus.token_requests[0].status_code == 202
    assert servicebus.messages(queue) == []


def test_unknown_entity_raises_not_found(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("missing")

    with pytest.raises(MessagingEntityNotFoundError) as raised:
        send(servicebus.connection_string(), queue, ServiceBusMessage(b"x"))

    assert condition(raised.value) == "amqp:not-found"
    assert queue in str(raised.value)
    assert servicebus.messages() == []


def test_removed_entity_raises_not_found(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    servicebus.remove_entity(queue)

    with pytest.raises(MessagingEntityNotFoundError):
        send(servicebus.connection_string(), queue, ServiceBusMessage(b"x"))


def test_session_queue_requires_session_id(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("ordered")
    servicebus.add_queue(queue, requires_session=True)

    with pytest.raises(ServiceBusError) as raised:
        send(servicebus.connection_string(), queue, ServiceBusMessage(b"x"))

    assert condition(raised.value) == "amqp:not-allowed"
    assert "The SessionId was not set on a message" in str(raised.value)
    assert servicebus.messages(queue) == []


def test_session_queue_accepts_session_id(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("ordered")
    servicebus.add_queue(queue, requires_session=True)

    send(servicebus.connection_string(), queue, ServiceBusMessage(b"x", session_id="k"))

    [recorded] = servicebus.messages(queue)
    assert recorded.session_id == "k"


def test_batch_without_session_id_rejected_whole(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("ordered")
    servicebus.add_queue(queue, requires_session=True)
    messages = [
        ServiceBusMessage(b"a", session_id="k"),
        ServiceBusMessage(b"b"),
    ]

    with pytest.raises(ServiceBusError) as raised:
        send(servicebus.connection_string(), queue, messages)

    assert condition(raised.value) == "amqp:not-allowed"
    assert servicebus.messages(queue) == []


def test_sessions_switched_on_by_method(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    send(servicebus.connection_string(), queue, ServiceBusMessage(b"before"))

    servicebus.set_requires_session(queue, True)

    with pytest.raises(ServiceBusError) as raised:
        send(servicebus.connection_string(), queue, ServiceBusMessage(b"after"))
    assert condition(raised.value) == "amqp:not-allowed"
    assert [m.body for m in servicebus.messages(queue)] == [b"before"]


def test_oversized_message_rejected(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)

    with pytest.raises(MessageSizeExceededError) as raised:
        send(servicebus.connection_string(), queue, ServiceBusMessage(b"x" * 262_145))

    assert condition(raised.value) == "amqp:link:message-size-exceeded"
    assert "262144 bytes" in str(raised.value)
    assert servicebus.messages(queue) == []


def test_max_message_size_set_per_entity(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("small")
    servicebus.add_queue(queue, max_message_size=1_024)

    send(servicebus.connection_string(), queue, ServiceBusMessage(b"x" * 900))
    with pytest.raises(MessageSizeExceededError):
        send(servicebus.connection_string(), queue, ServiceBusMessage(b"x" * 1_100))
    servicebus.set_max_message_size(queue, 4_096)
    send(servicebus.connection_string(), queue, ServiceBusMessage(b"x" * 1_100))

    assert [len(m.body) for m in servicebus.messages(queue)] == [900, 1_100]


def test_fail_next_rejects_chosen_count(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    servicebus.fail_next(2, SERVER_BUSY)

    for _ in range(2):
        with pytest.raises(ServiceBusServerBusyError):
            send(servicebus.connection_string(), queue, ServiceBusMessage(b"busy"))
    send(servicebus.connection_string(), queue, ServiceBusMessage(b"ok"))

    assert [m.body for m in servicebus.messages(queue)] == [b"ok"]


def test_fail_next_internal_error_by_default(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    servicebus.fail_next()

    with pytest.raises(ServiceBusError) as raised:
        send(servicebus.connection_string(), queue, ServiceBusMessage(b"x"))

    assert condition(raised.value) == "amqp:internal-error"
    assert servicebus.messages(queue) == []


def test_fail_next_can_detach_the_link(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    servicebus.fail_next(1, "amqp:link:detach-forced", detach=True)

    with pytest.raises(ServiceBusConnectionError):
        send(servicebus.connection_string(), queue, ServiceBusMessage(b"lost"))
    send(servicebus.connection_string(), queue, ServiceBusMessage(b"ok"))

    assert [m.body for m in servicebus.messages(queue)] == [b"ok"]


def test_ignore_next_lets_send_time_out(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    servicebus.ignore_next(1)

    client = ServiceBusClient.from_connection_string(
        servicebus.connection_string(), retry_total=0
    )
    with (
        client,
        client.get_queue_sender(queue_name=queue) as sender,
        pytest.raises(OperationTimeoutError),
    ):
        sender.send_messages(ServiceBusMessage(b"ignored"), timeout=1)

    send(servicebus.connection_string(), queue, ServiceBusMessage(b"ok"))
    assert [m.body for m in servicebus.messages(queue)] == [b"ok"]


def test_fail_next_limited_to_one_entity(servicebus: ServiceBusPeer) -> None:
    failing = unique_entity_name("failing")
    other = unique_entity_name("other")
    servicebus.add_queue(failing)
    servicebus.add_queue(other)
    servicebus.fail_next(1, SERVER_BUSY, entity=failing)

    send(servicebus.connection_string(), other, ServiceBusMessage(b"other"))
    with pytest.raises(ServiceBusServerBusyError):
        send(servicebus.connection_string(), failing, ServiceBusMessage(b"failing"))

    assert len(servicebus.messages(other)) == 1
    assert servicebus.messages(failing) == []


def test_detached_idle_sender_fails_next_send(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    client = ServiceBusClient.from_connection_string(
        servicebus.connection_string(), retry_total=0
    )
    with client, client.get_queue_sender(queue_name=queue) as sender:
        sender.send_messages(ServiceBusMessage(b"first"), timeout=10)
        servicebus.detach_senders()

        with pytest.raises(ServiceBusConnectionError):
            sender.send_messages(ServiceBusMessage(b"dropped"), timeout=10)
        sender.send_messages(ServiceBusMessage(b"third"), timeout=10)

    assert [m.body for m in servicebus.messages(queue)] == [b"first", b"third"]


def test_concurrent_sends_all_recorded(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    errors: list[BaseException] = []

    def send_three(thread: int) -> None:
        try:
            messages = [
                ServiceBusMessage(b"x", message_id=f"{thread}-{n}") for n in range(3)
            ]
            for message in messages:
                send(servicebus.connection_string(), queue, message)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=send_three, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    ids = sorted(m.message_id or "" for m in servicebus.messages(queue))
    assert ids == sorted(f"{t}-{n}" for t in range(4) for n in range(3))
    assert servicebus.connections_opened == 12


def test_clear_forgets_records_and_failures(servicebus: ServiceBusPeer) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    send(servicebus.connection_string(), queue, ServiceBusMessage(b"x"))
    servicebus.fail_next(3)

    servicebus.clear()

    assert servicebus.messages() == []
    assert servicebus.token_requests == []
    assert servicebus.connections_opened == 0
    send(servicebus.connection_string(), queue, ServiceBusMessage(b"y"))
    assert [m.body for m in servicebus.messages(queue)] == [b"y"]


def test_connection_string_keeps_port_and_emulator_flag(
    servicebus: ServiceBusPeer,
) -> None:
    text = servicebus.connection_string("orders")

    assert text.startswith(f"Endpoint=sb://127.0.0.1:{servicebus.port};")
    assert f"SharedAccessKeyName={servicebus.key_name};" in text
    assert "EntityPath=orders;" in text
    assert text.endswith(";UseDevelopmentEmulator=true")


def test_peer_repr_hides_key(servicebus: ServiceBusPeer) -> None:
    assert servicebus.key not in repr(servicebus)


def test_stopped_peer_refuses_connections() -> None:
    peer = start_servicebus_peer(queues=["orders"])
    send(peer.connection_string(), "orders", ServiceBusMessage(b"x"))

    peer.stop()

    with pytest.raises(ServiceBusConnectionError):
        send(peer.connection_string(), "orders", ServiceBusMessage(b"y"))


def test_start_options_create_entities() -> None:
    peer = start_servicebus_peer(
        queues=["plain"],
        session_queues=["ordered"],
        topics=["events"],
        session_topics=["ordered-events"],
        key_name="Sender",
        key="c2VjcmV0",
        max_message_size=2_048,
    )
    try:
        entities = {
            name: peer.entity(name)
            for name in ("plain", "ordered", "events", "ordered-events")
        }
        assert peer.key_name == "Sender"
        assert peer.key == "c2VjcmV0"
        assert {n: e.requires_session for n, e in entities.items() if e} == {
            "plain": False,
            "ordered": True,
            "events": False,
            "ordered-events": True,
        }
        assert {str(e.type) for e in entities.values() if e} == {"queue", "topic"}
        assert {e.max_message_size for e in entities.values() if e} == {2_048}
    finally:
        peer.stop()


def test_command_prints_working_connection_string() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "delivery.peers.servicebus",
            "--port",
            "0",
            "--queue",
            "orders",
            "--session-queue",
            "ordered",
        ],
        cwd=Path(settings.BASE_DIR),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("Endpoint=sb://127.0.0.1:")
        assert line.endswith(";UseDevelopmentEmulator=true")

        send(line, "orders", ServiceBusMessage(b"x"))
        with pytest.raises(ServiceBusError):
            send(line, "ordered", ServiceBusMessage(b"no session id"))
    finally:
        process.terminate()
        process.wait(timeout=COMMAND_START_SECONDS)
    assert process.returncode == 0


def test_token_verification_accepts_client_token() -> None:
    policy = SharedAccessPolicy("Sender", generate_key())
    token = make_token("sb://127.0.0.1:5672/orders", policy)

    verified = verify_token(
        token, "sb://127.0.0.1:5672/orders", {policy.name: policy}, time.time()
    )

    assert verified.key_name == "Sender"
    assert verified.resource_path == "orders"


@pytest.mark.parametrize(
    ("audience", "key", "lifetime", "expected"),
    [
        ("sb://127.0.0.1:5672/orders", "c2VjcmV0", 3600, "InvalidSignature"),
        ("sb://127.0.0.1:5672/orders", None, -10, "ExpiredToken"),
        ("sb://127.0.0.1:5672/invoices", None, 3600, "InvalidAudience"),
    ],
)
def test_token_verification_rejects(
    audience: str, key: str | None, lifetime: int, expected: str
) -> None:
    policy = SharedAccessPolicy("Sender", generate_key())
    signer = SharedAccessPolicy("Sender", key or policy.key)
    token = make_token("sb://127.0.0.1:5672/orders", signer, lifetime=lifetime)

    with pytest.raises(TokenRejected) as raised:
        verify_token(token, audience, {policy.name: policy})

    assert raised.value.description.startswith(expected)
    assert policy.key not in raised.value.description
    assert raised.value.key_name == "Sender"


def test_plain_json_body_not_taken_for_batch() -> None:
    from proton import Message

    raw = Message(body=b'{"a": 1}', id="plain", inferred=True).encode()

    batched, [message] = decode_transfer(raw)

    assert batched is False
    assert message.message_id == "plain"
    assert message.body == b'{"a": 1}'
