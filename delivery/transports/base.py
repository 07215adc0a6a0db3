"""The interface every destination kind implements.

A transport takes one destination's configuration and a batch of outgoing messages
and returns one result per message, in the same order. It uses neither Celery nor
the delivery tables: the engine records what it returns.
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

from destinations.models import Destination


@dataclass(frozen=True)
class OutgoingMessage:
    event_id: str
    event_type: str
    # The changed object's id: MessageGroupId, ordering key or session id.
    object_key: str
    # The event envelope as UTF-8 JSON, exactly as the partner receives it.
    body: bytes


@dataclass(frozen=True)
class Sent:
    remote_message_id: str


class Blame(StrEnum):
    """Whose fault a permanent failure is, which decides what an ordered key does."""

    # Nothing will get through until the partner fixes the destination (access,
    # missing queue, bad credentials): pause it and keep everything behind it.
    DESTINATION = "destination"
    # Only this message can never be sent (too large): fail it and move on.
    MESSAGE = "message"
    # A transient failure: try again later.
    NONE = "none"


@dataclass(frozen=True)
class Failure:
    # A stable code such as "queue_not_found", for filtering and tests.
    kind: str
    # A sentence a partner can act on: what failed, on which resource, what to do.
    message: str
    permanent: bool
    blame: Blame = Blame.NONE


Result = Sent | Failure


@dataclass
class CheckResult:
    """The outcome of checking a destination without sending to it."""

    # True only when the check confirmed access and found nothing to fix.
    ok: bool
    # Facts read from the destination's service, such as its maximum message size.
    findings: list[str] = field(default_factory=list)
    # Settings of this destination that differ from the service's: each names both
    # values and the fix.
    mismatches: list[str] = field(default_factory=list)
    # Why the check could not get through, as sending would report it.
    failure: Failure | None = None


class Transport(ABC):
    """Sends to one destination; instances may be cached and reused in a process."""

    kind: ClassVar[str]

    def __init__(self, destination: Destination) -> None:
        self.destination = destination

    @abstractmethod
    def send(self, messages: Sequence[OutgoingMessage]) -> list[Result]:
        """Send `messages` in order and return one result per message."""

    def check(self) -> CheckResult:
        """Check access to the destination and compare its settings with the
        service's, without sending a message.

        Kinds whose protocol offers no such check keep this default.
        """
        return CheckResult(
            ok=False,
            findings=[
                "No check without side effects exists for "
                f"{self.destination.get_kind_display()} destinations. Send a test "
                "event to check access."
            ],
        )
