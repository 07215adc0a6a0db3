"""The Service Bus peer's entities, policies and records, shared between its network
thread and the tests' threads behind one lock."""

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .sas import SharedAccessPolicy, entity_path

# The maximum message size of the Standard tier (Service Bus quotas, "Message size
# for a queue, topic, or subscription entity"), which the peer applies by default.
DEFAULT_MAX_MESSAGE_SIZE = 262_144

INTERNAL_ERROR = "amqp:internal-error"
SERVER_BUSY = "com.microsoft:server-busy"
TIMEOUT = "com.microsoft:timeout"
# The condition Service Bus detaches an idle sender link with, after 10 minutes.
DETACH_FORCED = "amqp:link:detach-forced"


class FailureAction(StrEnum):
    # Reject the message with the failure's condition.
    REJECT = "reject"
    # Detach the sender link with the failure's condition.
    DETACH = "detach"
    # Leave the message unsettled, so that the client's send times out.
    IGNORE = "ignore"


class EntityType(StrEnum):
    QUEUE = "queue"
    TOPIC = "topic"


@dataclass(frozen=True)
class Entity:
    name: str
    type: EntityType = EntityType.QUEUE
    requires_session: bool = False
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE


@dataclass(frozen=True)
class RecordedMessage:
    """One message the peer accepted; a batch is recorded as its inner messages."""

    entity: str
    message_id: str | None
    session_id: str | None
    partition_key: str | None
    content_type: str | None
    subject: str | None
    correlation_id: str | None
    application_properties: dict[str, Any]
    body: bytes
    batched: bool
    # The bytes of the whole transfer, the batch envelope included.
    transfer_size: int


@dataclass(frozen=True)
class TokenRequest:
    """One put-token request and the status code of the peer's response."""

    audience: str
    key_name: str | None
    status_code: int


@dataclass(frozen=True)
class InjectedFailure:
    """A planned failure of one send."""

    condition: str = INTERNAL_ERROR
    description: str = "The peer failed this send because fail_next requested it."
    action: FailureAction = FailureAction.REJECT
    # Only sends to this entity fail; None fails sends to any entity.
    entity: str | None = None


@dataclass
class PeerState:
    policies: dict[str, SharedAccessPolicy]
    entities: dict[str, Entity] = field(default_factory=dict)
    messages: list[RecordedMessage] = field(default_factory=list)
    token_requests: list[TokenRequest] = field(default_factory=list)
    connections_opened: int = 0
    attach_count: int = 0
    failures: deque[InjectedFailure] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_entity(self, entity: Entity) -> None:
        with self.lock:
            self.entities[entity_path(entity.name)] = entity

    def remove_entity(self, name: str) -> None:
        with self.lock:
            self.entities.pop(entity_path(name), None)

    def entity(self, path: str) -> Entity | None:
        with self.lock:
            return self.entities.get(entity_path(path))

    def add_policy(self, policy: SharedAccessPolicy) -> None:
        with self.lock:
            self.policies[policy.name] = policy

    def policies_snapshot(self) -> dict[str, SharedAccessPolicy]:
        with self.lock:
            return dict(self.policies)

    def record_messages(self, messages: Iterable[RecordedMessage]) -> None:
        with self.lock:
            self.messages.extend(messages)

    def record_token_request(self, request: TokenRequest) -> None:
        with self.lock:
            self.token_requests.append(request)

    def count_connection(self) -> None:
        with self.lock:
            self.connections_opened += 1

    def count_attach(self) -> None:
        with self.lock:
            self.attach_count += 1

    def add_failures(self, count: int, failure: InjectedFailure) -> None:
        with self.lock:
            self.failures.extend([failure] * count)

    def take_failure(self, entity: Entity) -> InjectedFailure | None:
        """Remove and return the first injected failure that applies to `entity`."""
        with self.lock:
            for failure in self.failures:
                if failure.entity is None or entity_path(failure.entity) == entity_path(
                    entity.name
                ):
                    self.failures.remove(failure)
                    return failure
            return None

    def clear(self) -> None:
        """Forget recorded messages, token requests, counters and pending failures."""
        with self.lock:
            self.messages.clear()
            self.token_requests.clear()
            self.failures.clear()
            self.connections_opened = 0
            self.attach_count = 0
