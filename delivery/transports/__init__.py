"""The registry of transports: one module per destination kind."""

from destinations.models import Destination

from .base import Blame, Failure, OutgoingMessage, Result, Sent, Transport

TRANSPORTS: dict[str, type[Transport]] = {}


def register(transport: type[Transport]) -> type[Transport]:
    TRANSPORTS[transport.kind] = transport
    return transport


def transport_for(destination: Destination) -> Transport | None:
    """Return a transport for `destination`, or None if its kind cannot send yet."""
    transport = TRANSPORTS.get(destination.kind)
    return transport(destination) if transport else None


__all__ = [
    "TRANSPORTS",
    "Blame",
    "Failure",
    "OutgoingMessage",
    "Result",
    "Sent",
    "Transport",
    "register",
    "transport_for",
]

# Each kind's module registers its transport when imported, so it comes after
# `register` exists.
from . import pubsub  # noqa: E402, F401, I001
from . import sqs  # noqa: E402, F401
from . import servicebus  # noqa: E402, F401
