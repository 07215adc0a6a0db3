"""Fixtures for Service Bus: the local AMQP peer and destinations that send to it."""

import uuid
from collections.abc import Callable, Iterator

import pytest

from delivery.peers.servicebus import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ServiceBusPeer,
    start_servicebus_peer,
)
from delivery.transports.servicebus import close_senders
from destinations.models import Application, Destination, EntityType, Kind, Stage


@pytest.fixture(scope="session")
def servicebus_peer() -> Iterator[ServiceBusPeer]:
    """The Service Bus peer on 127.0.0.1, for the whole run. Tests create entities
    with unique names, because they all share it."""
    peer = start_servicebus_peer(host="127.0.0.1", port=0)
    yield peer
    close_senders()
    peer.stop()


@pytest.fixture
def servicebus(servicebus_peer: ServiceBusPeer) -> Iterator[ServiceBusPeer]:
    """The session's peer with its records and counters cleared, and no sender of
    an earlier test cached in this process."""
    close_senders()
    servicebus_peer.clear()
    yield servicebus_peer
    close_senders()
    servicebus_peer.clear()


def unique_entity_name(prefix: str = "orders") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


MakeServiceBusDestination = Callable[..., Destination]


@pytest.fixture
def make_servicebus_destination(
    servicebus: ServiceBusPeer, db: None
) -> MakeServiceBusDestination:
    """Return a function that saves a Service Bus destination sending to the peer.

    The entity is created on the peer with the destination's sessions setting,
    unless `create_entity` is False.
    """
    application = Application.objects.create(
        name="Orders", slug=f"orders-{uuid.uuid4().hex[:8]}"
    )

    def make(
        entity: str | None = None,
        *,
        entity_type: str = EntityType.QUEUE,
        sessions: bool = False,
        partitioning: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        connection_string: str | None = None,
        create_entity: bool = True,
    ) -> Destination:
        # An empty `entity` leaves the name to the connection string's EntityPath.
        name = unique_entity_name(str(entity_type)) if entity is None else entity
        if create_entity and entity_type == EntityType.TOPIC:
            servicebus.add_topic(name, requires_session=sessions)
        elif create_entity:
            servicebus.add_queue(name, requires_session=sessions)
        destination = Destination(
            application=application,
            stage=Stage.TEST,
            kind=Kind.SERVICEBUS,
            name=f"{entity_type} {name or 'from EntityPath'}",
            servicebus_entity_type=entity_type,
            servicebus_entity_name=name,
            servicebus_sessions=sessions,
            servicebus_partitioning=partitioning,
            servicebus_max_message_size=max_message_size,
        )
        destination.set_connection_string(
            connection_string or servicebus.connection_string()
        )
        destination.save()
        return destination

    return make
