"""The Service Bus transport, sending over AMQP to the local Service Bus peer."""

import hashlib
import json
import logging
from pathlib import Path

import pytest
from pytest_django import Settings

from delivery.peers.servicebus import (
    DETACH_FORCED,
    SERVER_BUSY,
    ServiceBusPeer,
    generate_key,
)
from delivery.peers.sqs import free_port
from delivery.transports import (
    TRANSPORTS,
    Blame,
    Failure,
    OutgoingMessage,
    Sent,
    transport_for,
)
from delivery.transports.servicebus import ServiceBusTransport, service_bus_id
from destinations.models import Destination, EntityType, Kind

from .servicebus_fixtures import MakeServiceBusDestination, unique_entity_name

FIXTURES = Path(__file__).parent / "fixtures"
ORDER_KEY = "FKO-2025-000001-A"

pytestmark = pytest.mark.django_db


def order_event() -> OutgoingMessage:
    """The sample ACCEPT event as the engine hands it over: the whole envelope as
    compact JSON, keyed by the order's channel_order_id."""
    envelope = json.loads((FIXTURES / "order_action_accept.json").read_text())
    body = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()
    return OutgoingMessage(
        event_id=envelope["id"],
        event_type=envelope["type"],
        object_key=envelope["data"]["channel_order_id"],
        body=body,
    )


def event(
    number: int, key: str = "order-1", body: bytes | None = None
) -> OutgoingMessage:
    return OutgoingMessage(
        event_id=f"evt-{number}",
        event_type="ACCEPT",
        object_key=key,
        body=body if body is not None else f'{{"n":{number}}}'.encode(),
    )


def send(destination: Destination, *messages: OutgoingMessage) -> list[Sent | Failure]:
    transport = transport_for(destination)
    assert isinstance(transport, ServiceBusTransport)
    return transport.send(list(messages))


def only_failure(results: list[Sent | Failure]) -> Failure:
    [result] = results
    assert isinstance(result, Failure), result
    return result


def test_transport_registered_for_servicebus() -> None:
    assert TRANSPORTS[Kind.SERVICEBUS] is ServiceBusTransport


def test_order_event_to_session_queue_with_partitioning(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination(sessions=True, partitioning=True)
    message = order_event()

    results = send(destination, message)

    assert results == [Sent(remote_message_id=message.event_id)]
    [recorded] = servicebus.messages(destination.servicebus_entity_name)
    assert recorded.body == message.body
    assert json.loads(recorded.body)["data"]["channel_order_id"] == ORDER_KEY
    assert recorded.content_type == "application/json"
    assert recorded.message_id == "01jndg9q00szajyh54fp5wvwjv"
    assert recorded.application_properties == {
        "event_type": "ACCEPT",
        "event_id": "01jndg9q00szajyh54fp5wvwjv",
    }
    assert recorded.session_id == ORDER_KEY
    assert recorded.partition_key == ORDER_KEY


def test_topic_destination_receives_event(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination(
        entity_type=EntityType.TOPIC, partitioning=True
    )
    message = order_event()

    results = send(destination, message)

    assert results == [Sent(remote_message_id=message.event_id)]
    [recorded] = servicebus.messages(destination.servicebus_entity_name)
    assert recorded.body == message.body
    assert recorded.partition_key == ORDER_KEY
    assert recorded.session_id is None


def test_plain_queue_gets_no_session_or_partition_key(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination()

    send(destination, order_event())

    [recorded] = servicebus.messages(destination.servicebus_entity_name)
    assert recorded.session_id is None
    assert recorded.partition_key is None
    assert recorded.message_id == order_event().event_id


def test_session_entity_named_by_entity_path(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    queue = unique_entity_name("ordered")
    servicebus.add_queue(queue, requires_session=True)
    destination = make_servicebus_destination(
        entity="",
        sessions=True,
        create_entity=False,
        connection_string=servicebus.connection_string(queue),
    )

    results = send(destination, event(1))

    assert destination.servicebus_entity_name == queue
    assert results == [Sent(remote_message_id="evt-1")]
    assert [m.session_id for m in servicebus.messages(queue)] == ["order-1"]


def test_several_events_sent_as_one_batch_in_order(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination()

    results = send(destination, *(event(n, key=f"order-{n}") for n in range(5)))

    assert results == [Sent(remote_message_id=f"evt-{n}") for n in range(5)]
    recorded = servicebus.messages(destination.servicebus_entity_name)
    assert [m.message_id for m in recorded] == [f"evt-{n}" for n in range(5)]
    assert all(m.batched for m in recorded)
    assert len({m.transfer_size for m in recorded}) == 1


def test_session_batches_hold_one_session_each(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination(sessions=True, partitioning=True)
    keys = ["order-a", "order-a", "order-b", "order-a"]

    results = send(destination, *(event(n, key) for n, key in enumerate(keys)))

    assert results == [Sent(remote_message_id=f"evt-{n}") for n in range(4)]
    recorded = servicebus.messages(destination.servicebus_entity_name)
    assert [m.session_id for m in recorded] == keys
    assert [m.batched for m in recorded] == [True, True, False, False]


def test_sessions_without_partitioning_share_a_batch(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination(sessions=True)
    keys = ["order-a", "order-a", "order-b", "order-a"]

    results = send(destination, *(event(n, key) for n, key in enumerate(keys)))

    assert results == [Sent(remote_message_id=f"evt-{n}") for n in range(4)]
    recorded = servicebus.messages(destination.servicebus_entity_name)
    assert [(m.session_id, m.message_id) for m in recorded] == [
        (key, f"evt-{n}") for n, key in enumerate(keys)
    ]
    # One transfer: Service Bus takes or refuses the batch whole, so no message of
    # a session can overtake an earlier one that failed.
    assert all(m.batched for m in recorded)
    assert len({m.transfer_size for m in recorded}) == 1


def test_full_batches_fit_the_link(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination(sessions=True)
    # About 470 bytes each, like an order event: the SDK's own count of a full
    # batch of these came out 28 bytes over the link's limit.
    body = b'{"pad":"' + b"x" * 450 + b'"}'
    messages = [event(n, f"order-{n % 100:03d}", body) for n in range(1_200)]

    results = send(destination, *messages)

    assert results == [Sent(remote_message_id=f"evt-{n}") for n in range(1_200)]
    recorded = servicebus.messages(destination.servicebus_entity_name)
    assert [m.message_id for m in recorded] == [f"evt-{n}" for n in range(1_200)]
    assert all(m.batched for m in recorded)
    limit = destination.servicebus_max_message_size
    assert max(m.transfer_size for m in recorded) <= limit
    # Full batches, not one message per send after a refused batch.
    assert len({m.transfer_size for m in recorded}) <= 5


def test_long_object_key_hashed_to_valid_session_id(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination(sessions=True, partitioning=True)
    key = "order-" + "x" * 200
    expected = "sha256-" + hashlib.sha256(key.encode()).hexdigest()

    send(destination, event(1, key), event(2, key))

    recorded = servicebus.messages(destination.servicebus_entity_name)
    assert [m.session_id for m in recorded] == [expected, expected]
    assert [m.partition_key for m in recorded] == [expected, expected]


@pytest.mark.parametrize(
    ("key", "kept"),
    [
        ("FKO-2025-000001-A", True),
        ("k" * 128, True),
        ("é" * 128, True),
        ("k" * 129, False),
        ("", False),
        ("line\nbreak", False),
        # Outside the Basic Multilingual Plane: two UTF-16 code units each.
        ("\U0001f600" * 64, True),
        ("\U0001f600" * 65, False),
    ],
)
def test_service_bus_id_keeps_or_hashes(key: str, kept: bool) -> None:
    result = service_bus_id(key)

    assert (result == key) is kept
    assert len(result) <= 128
    assert result == service_bus_id(key)


def test_sender_reused_across_sends(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination()

    first = send(destination, event(1))
    second = send(destination, event(2))

    assert first == [Sent(remote_message_id="evt-1")]
    assert second == [Sent(remote_message_id="evt-2")]
    assert servicebus.connections_opened == 1
    assert len(servicebus.token_requests) == 1


def test_wrong_key_is_permanent_unauthorized(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    key = generate_key()
    destination = make_servicebus_destination(
        connection_string=servicebus.connection_string(key=key)
    )

    failure = only_failure(send(destination, event(1)))

    assert failure.kind == "unauthorized"
    assert failure.permanent is True
    assert failure.blame == Blame.DESTINATION
    assert f"'{servicebus.key_name}'" in failure.message
    assert "Send claim" in failure.message
    assert key not in failure.message
    # One token request on one connection: the SDK did not retry the 401.
    assert [r.status_code for r in servicebus.token_requests] == [401]
    assert servicebus.connections_opened == 1


def test_wrong_key_name_is_permanent_unauthorized(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination(
        connection_string=servicebus.connection_string(key_name="Publisher")
    )

    failure = only_failure(send(destination, event(1)))

    assert failure.kind == "unauthorized"
    assert failure.permanent is True
    assert "'Publisher'" in failure.message
    assert servicebus.key not in failure.message
    assert len(servicebus.token_requests) == 1


def test_policy_without_send_is_access_denied(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    key = generate_key()
    servicebus.add_policy("Monitoring", key, rights=["Listen"])
    destination = make_servicebus_destination(
        connection_string=servicebus.connection_string(key_name="Monitoring", key=key)
    )

    failure = only_failure(send(destination, event(1)))

    assert failure.kind == "access_denied"
    assert failure.permanent is True
    assert failure.blame == Blame.DESTINATION
    assert "'Monitoring'" in failure.message
    assert "Send claim" in failure.message
    assert key not in failure.message


def test_missing_entity_is_permanent_not_found(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination(create_entity=False)
    queue = destination.servicebus_entity_name

    failure = only_failure(send(destination, event(1)))

    assert failure.kind == "entity_not_found"
    assert failure.permanent is True
    assert failure.blame == Blame.DESTINATION
    assert f"queue '{queue}'" in failure.message
    assert "does not exist" in failure.message


def test_session_entity_without_sessions_setting(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination(create_entity=False)
    servicebus.add_queue(destination.servicebus_entity_name, requires_session=True)

    failure = only_failure(send(destination, event(1)))

    assert failure.kind == "session_required"
    assert failure.permanent is True
    assert failure.blame == Blame.DESTINATION
    assert "sessions required" in failure.message
    assert servicebus.messages(destination.servicebus_entity_name) == []


def test_entity_path_mismatch_is_permanent(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    queue = unique_entity_name("orders")
    servicebus.add_queue(queue)
    destination = make_servicebus_destination(
        entity="",
        create_entity=False,
        connection_string=servicebus.connection_string(queue),
    )
    # Saved before validation checked the entity name against EntityPath.
    Destination.objects.filter(pk=destination.pk).update(
        servicebus_entity_name="invoices"
    )
    destination.refresh_from_db()

    failure = only_failure(send(destination, event(1)))

    assert failure.kind == "invalid_configuration"
    assert failure.permanent is True
    assert failure.blame == Blame.DESTINATION
    assert "EntityPath" in failure.message
    assert servicebus.connections_opened == 0


def test_oversized_event_fails_before_sending(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination()
    message = event(1, body=b"x" * 262_144)

    failure = only_failure(send(destination, message))

    assert failure.kind == "too_large"
    assert failure.permanent is True
    assert failure.blame == Blame.MESSAGE
    assert "262,144 bytes" in failure.message
    assert servicebus.connections_opened == 0


def test_event_over_entity_limit_rejected_by_service(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    # The destination allows more than the entity does: the peer judges the size.
    destination = make_servicebus_destination(max_message_size=1_048_576)
    servicebus.set_max_message_size(destination.servicebus_entity_name, 4_096)

    failure = only_failure(send(destination, event(1, body=b"x" * 5_000)))

    assert failure.kind == "too_large"
    assert failure.permanent is True
    assert failure.blame == Blame.MESSAGE
    assert "amqp:link:message-size-exceeded" in failure.message


def test_oversized_event_skipped_in_batch(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination(max_message_size=4_096)

    results = send(destination, event(1), event(2, body=b"x" * 5_000), event(3))

    assert results[0] == Sent(remote_message_id="evt-1")
    assert isinstance(results[1], Failure)
    assert results[1].kind == "too_large"
    assert results[2] == Sent(remote_message_id="evt-3")
    recorded = servicebus.messages(destination.servicebus_entity_name)
    assert [m.message_id for m in recorded] == ["evt-1", "evt-3"]


def test_batch_refused_as_too_large_sent_singly(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination()
    servicebus.fail_next(1, "amqp:link:message-size-exceeded")

    results = send(destination, event(1, "order-a"), event(2, "order-b"))

    assert results == [Sent(remote_message_id="evt-1"), Sent(remote_message_id="evt-2")]
    recorded = servicebus.messages(destination.servicebus_entity_name)
    assert [m.message_id for m in recorded] == ["evt-1", "evt-2"]
    assert [m.batched for m in recorded] == [False, False]


def test_injected_error_is_transient_then_succeeds(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination()
    servicebus.fail_next(1)

    failure = only_failure(send(destination, event(1)))
    retried = send(destination, event(1))

    assert failure.kind == "service_error"
    assert failure.permanent is False
    assert failure.blame == Blame.NONE
    assert "amqp:internal-error" in failure.message
    assert retried == [Sent(remote_message_id="evt-1")]
    assert [m.message_id for m in servicebus.messages()] == ["evt-1"]
    # The failed sender was dropped, so the retry opened a new connection.
    assert servicebus.connections_opened == 2


def test_server_busy_is_transient(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination()
    servicebus.fail_next(1, SERVER_BUSY)

    failure = only_failure(send(destination, event(1)))
    retried = send(destination, event(1))

    assert failure.kind == "server_busy"
    assert failure.permanent is False
    assert retried == [Sent(remote_message_id="evt-1")]


def test_send_timeout_is_transient(
    servicebus: ServiceBusPeer,
    make_servicebus_destination: MakeServiceBusDestination,
    settings: Settings,
) -> None:
    settings.SERVICEBUS_TIMEOUT = 1.0
    destination = make_servicebus_destination()
    servicebus.ignore_next(1)

    failure = only_failure(send(destination, event(1)))
    retried = send(destination, event(1))

    assert failure.kind == "timeout"
    assert failure.permanent is False
    assert "1 s" in failure.message
    assert retried == [Sent(remote_message_id="evt-1")]
    assert [m.message_id for m in servicebus.messages()] == ["evt-1"]


def test_detach_during_send_is_transient(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination()
    servicebus.fail_next(1, DETACH_FORCED, detach=True)

    failure = only_failure(send(destination, event(1)))
    retried = send(destination, event(1))

    assert failure.kind == "connection_failed"
    assert failure.permanent is False
    assert retried == [Sent(remote_message_id="evt-1")]


def test_detached_idle_sender_reconnects_once(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination()
    send(destination, event(1))
    servicebus.detach_senders()

    results = send(destination, event(2))

    assert results == [Sent(remote_message_id="evt-2")]
    recorded = servicebus.messages(destination.servicebus_entity_name)
    assert [m.message_id for m in recorded] == ["evt-1", "evt-2"]
    assert servicebus.connections_opened == 2


def test_failure_stops_later_messages(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination(sessions=True)
    servicebus.fail_next(1, SERVER_BUSY)

    results = send(destination, event(1, "order-a"), event(2, "order-b"))

    assert all(isinstance(result, Failure) for result in results)
    assert [r.kind for r in results if isinstance(r, Failure)] == ["server_busy"] * 2
    assert servicebus.messages() == []


def test_unreachable_namespace_is_transient(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    port = free_port("127.0.0.1")
    connection_string = (
        f"Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName=Sender;"
        f"SharedAccessKey={generate_key()};UseDevelopmentEmulator=true"
    )
    destination = make_servicebus_destination(connection_string=connection_string)

    failure = only_failure(send(destination, event(1)))

    assert failure.kind == "connection_failed"
    assert failure.permanent is False
    assert f"127.0.0.1:{port}" in failure.message


def test_rotated_connection_string_used_at_once(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination(
        connection_string=servicebus.connection_string(key=generate_key())
    )
    failure = only_failure(send(destination, event(1)))

    destination.set_connection_string(servicebus.connection_string())
    destination.save()
    results = send(destination, event(1))

    assert failure.kind == "unauthorized"
    assert results == [Sent(remote_message_id="evt-1")]


def test_undecryptable_connection_string_is_transient(
    settings: Settings, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination()
    settings.ENCRYPTION_KEYS = ["rD4Ar5mIx9ctQ5C8CLrGdxk1nrZe2DPtwMBVLhJ3TBU="]

    failure = only_failure(send(destination, event(1)))

    assert failure.kind == "platform_settings"
    assert failure.permanent is False
    assert "ENCRYPTION_KEYS" in failure.message


def test_secret_never_in_failures_or_logs(
    servicebus: ServiceBusPeer,
    make_servicebus_destination: MakeServiceBusDestination,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong_key = generate_key()
    destinations = [
        make_servicebus_destination(
            connection_string=servicebus.connection_string(key=wrong_key)
        ),
        make_servicebus_destination(create_entity=False),
        make_servicebus_destination(sessions=False),
        make_servicebus_destination(),
    ]
    servicebus.set_requires_session(destinations[2].servicebus_entity_name, True)
    servicebus.fail_next(1, entity=destinations[3].servicebus_entity_name)

    failures = [
        only_failure(send(destination, event(1))) for destination in destinations
    ]

    assert [f.kind for f in failures] == [
        "unauthorized",
        "entity_not_found",
        "session_required",
        "service_error",
    ]
    secrets = [servicebus.key, wrong_key]
    for secret in secrets:
        assert all(secret not in failure.message for failure in failures)
        assert secret not in caplog.text
        assert all(secret not in str(record.args) for record in caplog.records)
    assert all("SharedAccessKey=" not in failure.message for failure in failures)
