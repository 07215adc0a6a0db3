"""A Service Bus peer: an AMQP 1.0 listener on a loopback address, in this process.

It responds to azure-servicebus senders as a Service Bus namespace does. It checks the
shared access signature of each put-token request against its shared access
policies. It keeps a list of queues and topics, some requiring sessions, and it
rejects unknown entities, messages without a session id on a session entity and
oversized messages with the conditions Service Bus uses. It records every message it
accepts, a batch as its separate messages. `fail_next` makes it fail sends on
purpose, so that callers can test their retries.

Clients reach it with the connection string from `connection_string()`, which holds
UseDevelopmentEmulator=true: azure-servicebus then keeps the port and connects over
plain TCP instead of TLS on port 5671.
"""

import base64
import logging
import os
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from proton.reactor import ApplicationEvent, Container, EventInjector

from .handler import DETACH_EVENT, STOP_EVENT, PeerHandler, quiet_proton_disconnects
from .sas import ALL_RIGHTS, SharedAccessPolicy, entity_path
from .state import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DETACH_FORCED,
    INTERNAL_ERROR,
    SERVER_BUSY,
    TIMEOUT,
    Entity,
    EntityType,
    FailureAction,
    InjectedFailure,
    PeerState,
    RecordedMessage,
    TokenRequest,
)

logger = logging.getLogger("delivery.peers.servicebus")

# The name Azure gives the policy every new namespace has.
DEFAULT_KEY_NAME = "RootManageSharedAccessKey"
STOP_TIMEOUT_SECONDS = 10.0


def generate_key() -> str:
    """Return a random key shaped like an Azure one: 32 bytes in base64."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class ServiceBusPeer:
    """A running peer; `stop()` ends it. Every method is safe from any thread."""

    host: str
    port: int
    key_name: str
    key: str = field(repr=False)
    _state: PeerState = field(repr=False)
    _injector: EventInjector = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def endpoint(self) -> str:
        return f"sb://{self.host}:{self.port}"

    def connection_string(
        self,
        entity_path: str | None = None,
        *,
        key_name: str | None = None,
        key: str | None = None,
    ) -> str:
        """Return a connection string for this peer, signed with its own policy
        unless another key name or key is given."""
        parts = [
            f"Endpoint={self.endpoint}",
            f"SharedAccessKeyName={key_name or self.key_name}",
            f"SharedAccessKey={key or self.key}",
        ]
        if entity_path:
            parts.append(f"EntityPath={entity_path}")
        parts.append("UseDevelopmentEmulator=true")
        return ";".join(parts)

    def add_queue(
        self,
        name: str,
        *,
        requires_session: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> Entity:
        """Create queue `name`, or replace its settings if it exists."""
        return self._add(name, EntityType.QUEUE, requires_session, max_message_size)

    def add_topic(
        self,
        name: str,
        *,
        requires_session: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> Entity:
        """Create topic `name`, or replace its settings if it exists. A topic whose
        subscriptions require sessions rejects messages without a session id."""
        return self._add(name, EntityType.TOPIC, requires_session, max_message_size)

    def _add(
        self,
        name: str,
        entity_type: EntityType,
        requires_session: bool,
        max_message_size: int,
    ) -> Entity:
        entity = Entity(name, entity_type, requires_session, max_message_size)
        self._state.add_entity(entity)
        return entity

    def set_requires_session(self, name: str, requires_session: bool) -> Entity:
        """Turn sessions on or off for an existing entity."""
        entity = self._existing(name)
        return self._add(
            entity.name, entity.type, requires_session, entity.max_message_size
        )

    def set_max_message_size(self, name: str, max_message_size: int) -> Entity:
        """Change an existing entity's maximum message size, in bytes."""
        entity = self._existing(name)
        return self._add(
            entity.name, entity.type, entity.requires_session, max_message_size
        )

    def _existing(self, name: str) -> Entity:
        entity = self._state.entity(name)
        if entity is None:
            raise KeyError(f"The peer has no queue or topic named {name!r}.")
        return entity

    def remove_entity(self, name: str) -> None:
        self._state.remove_entity(name)

    def entity(self, name: str) -> Entity | None:
        return self._state.entity(name)

    def add_policy(
        self, name: str, key: str, rights: Iterable[str] = ALL_RIGHTS
    ) -> SharedAccessPolicy:
        """Add a shared access policy, such as one with the Listen right only."""
        policy = SharedAccessPolicy(name, key, frozenset(rights))
        self._state.add_policy(policy)
        return policy

    def fail_next(
        self,
        count: int = 1,
        condition: str = INTERNAL_ERROR,
        *,
        description: str = "The peer failed this send because fail_next requested it.",
        detach: bool = False,
        entity: str | None = None,
    ) -> None:
        """Fail the next `count` sends (a batch is one send) with `condition`.

        Each is rejected with `condition`, or with `detach` its sender link is
        detached with `condition`, as Service Bus does to an idle link. With `entity`,
        only sends to that queue or topic fail.
        """
        action = FailureAction.DETACH if detach else FailureAction.REJECT
        failure = InjectedFailure(condition, description, action, entity)
        self._state.add_failures(count, failure)

    def ignore_next(self, count: int = 1, *, entity: str | None = None) -> None:
        """Leave the next `count` sends unsettled, so that they time out in the
        client. With `entity`, only sends to that queue or topic are ignored."""
        failure = InjectedFailure(action=FailureAction.IGNORE, entity=entity)
        self._state.add_failures(count, failure)

    def detach_senders(self) -> None:
        """Detach every link clients send on, as Service Bus does to a sender link
        idle for 10 minutes, and wait until the peer has sent the detaches."""
        done = threading.Event()
        self._injector.trigger(ApplicationEvent(DETACH_EVENT, subject=done))
        if not done.wait(STOP_TIMEOUT_SECONDS):
            raise TimeoutError(
                f"The Service Bus peer did not detach its links within "
                f"{STOP_TIMEOUT_SECONDS:g} s."
            )

    def messages(self, entity: str | None = None) -> list[RecordedMessage]:
        """Return the messages accepted so far, oldest first, of one entity or all."""
        with self._state.lock:
            recorded = list(self._state.messages)
        if entity is None:
            return recorded
        return [m for m in recorded if entity_path(m.entity) == entity_path(entity)]

    @property
    def token_requests(self) -> list[TokenRequest]:
        with self._state.lock:
            return list(self._state.token_requests)

    @property
    def connections_opened(self) -> int:
        with self._state.lock:
            return self._state.connections_opened

    @property
    def attach_count(self) -> int:
        """The links clients attached, $cbs links included."""
        with self._state.lock:
            return self._state.attach_count

    def clear(self) -> None:
        """Forget recorded messages, token requests, counters and pending failures;
        keep entities and policies."""
        self._state.clear()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._injector.trigger(ApplicationEvent(STOP_EVENT))
        self._thread.join(STOP_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            logger.warning(
                "Service Bus peer on %s:%d did not stop within %g s",
                self.host,
                self.port,
                STOP_TIMEOUT_SECONDS,
            )
            return
        for descriptor in self._injector.pipe:
            os.close(descriptor)
        logger.info("Service Bus peer on %s:%d stopped", self.host, self.port)


def start_servicebus_peer(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    queues: Iterable[str] = (),
    session_queues: Iterable[str] = (),
    topics: Iterable[str] = (),
    session_topics: Iterable[str] = (),
    key_name: str = DEFAULT_KEY_NAME,
    key: str | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> ServiceBusPeer:
    """Start a peer on `host`:`port` (0 picks a free port) in a thread of this
    process, with the given entities and one policy with every right.

    Without `key`, the policy gets a random key.
    """
    policy = SharedAccessPolicy(key_name, key or generate_key(), ALL_RIGHTS)
    state = PeerState(policies={policy.name: policy})
    for names, entity_type, requires_session in (
        (queues, EntityType.QUEUE, False),
        (session_queues, EntityType.QUEUE, True),
        (topics, EntityType.TOPIC, False),
        (session_topics, EntityType.TOPIC, True),
    ):
        for name in names:
            state.add_entity(
                Entity(name, entity_type, requires_session, max_message_size)
            )

    quiet_proton_disconnects()
    handler = PeerHandler(state, host)
    container = Container(handler)
    # The listener is bound here, before the event loop runs, so that a port in use
    # raises in the caller and the bound port is known at once.
    acceptor = container.acceptor(host, port)  # type: ignore[arg-type]
    # proton keeps the listening socket in a private attribute; its selectable
    # passes getsockname through to the socket.
    bound_port = int(acceptor._selectable.getsockname()[1])
    handler.acceptor = acceptor
    handler.container = container
    handler.port = bound_port
    injector = EventInjector()
    container.selectable(injector)

    thread = threading.Thread(
        target=container.run, name=f"servicebus-peer-{bound_port}", daemon=True
    )
    thread.start()
    logger.info("Service Bus peer listening on %s:%d", host, bound_port)
    return ServiceBusPeer(
        host=host,
        port=bound_port,
        key_name=policy.name,
        key=policy.key,
        _state=state,
        _injector=injector,
        _thread=thread,
    )


__all__ = [
    "ALL_RIGHTS",
    "DEFAULT_KEY_NAME",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DETACH_FORCED",
    "INTERNAL_ERROR",
    "SERVER_BUSY",
    "TIMEOUT",
    "Entity",
    "EntityType",
    "RecordedMessage",
    "ServiceBusPeer",
    "SharedAccessPolicy",
    "TokenRequest",
    "generate_key",
    "start_servicebus_peer",
]
