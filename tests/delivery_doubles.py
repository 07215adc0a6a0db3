"""A recording transport and the rows the delivery engine's tests start from.

The transport is a double of this project's own Transport interface, registered in
place of a kind's real transport. It records every batch it is given and returns the
results a test scripted per event id, so the test decides what the engine receives.
Sends over the wire are proven by each kind's transport tests against its local peer.
"""

import time
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from delivery import engine
from delivery.models import Delivery, DeliveryStatus, Event
from delivery.transports import (
    TRANSPORTS,
    Blame,
    Failure,
    OutgoingMessage,
    Result,
    Sent,
    Transport,
)
from destinations.models import Application, Destination, Kind, Stage

FIFO_QUEUE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo"
STANDARD_QUEUE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders"
CONTACTS = ["ops@example.com", "oncall@example.com"]
# Event times of the tests: the platform's events are in the past when delivered.
BASE_TIME = datetime(2025, 3, 3, 8, 0, tzinfo=UTC)

THROTTLED = Failure(
    kind="throttled",
    message="The queue throttled the request; the platform tries again.",
    permanent=False,
)
TOO_LARGE = Failure(
    kind="message_too_large",
    message="The event is larger than the queue's maximum message size.",
    permanent=True,
    blame=Blame.MESSAGE,
)
ACCESS_DENIED = Failure(
    kind="access_denied",
    message="The queue denied sqs:SendMessage; grant it to the platform's role.",
    permanent=True,
    blame=Blame.DESTINATION,
)


class Script:
    """The results a RecordingTransport returns, and the batches it was given."""

    def __init__(self) -> None:
        self.batches: list[list[OutgoingMessage]] = []
        self.delay_seconds = 0.0
        # Raised by send() instead of returning results, as a transport bug would.
        self.error: Exception | None = None
        # Sends every message of a key after its first failure, as a transport that
        # broke its contract would.
        self.ignores_order = False
        self._results: dict[str, deque[Result]] = defaultdict(deque)

    def then(self, event_id: str, *results: Result) -> None:
        """Queue `results` for the next sends of `event_id`; once they are used up,
        the event is sent."""
        self._results[event_id].extend(results)

    def result_for(self, message: OutgoingMessage) -> Result:
        scripted = self._results[message.event_id]
        if scripted:
            return scripted.popleft()
        return Sent(remote_message_id=f"remote-{message.event_id}")

    @property
    def sent(self) -> list[str]:
        """Every event id the transport tried to send, in order, failed sends
        included; not those it held back after an earlier failure of their key."""
        return [message.event_id for batch in self.batches for message in batch]

    def sent_with_key(self, key: str) -> list[str]:
        return [
            message.event_id
            for batch in self.batches
            for message in batch
            if message.object_key == key
        ]


def install_transport(monkeypatch: pytest.MonkeyPatch, kind: str = Kind.SQS) -> Script:
    """Register a RecordingTransport for `kind` for one test; return its script."""
    script = Script()

    class RecordingTransport(Transport):
        def send(self, messages: Sequence[OutgoingMessage]) -> list[Result]:
            if script.delay_seconds:
                time.sleep(script.delay_seconds)
            if script.error is not None:
                script.batches.append(list(messages))
                raise script.error
            # As every transport does on an ordered destination: after a key's
            # first failure that is not the message's own, its later messages get
            # that failure and are not sent.
            ordered = self.destination.is_ordered and not script.ignores_order
            attempted: list[OutgoingMessage] = []
            stopped: dict[str, Failure] = {}
            results: list[Result] = []
            for message in messages:
                failure = stopped.get(message.object_key) if ordered else None
                if failure is not None:
                    results.append(failure)
                    continue
                attempted.append(message)
                result = script.result_for(message)
                if isinstance(result, Failure) and result.blame != Blame.MESSAGE:
                    stopped[message.object_key] = result
                results.append(result)
            script.batches.append(attempted)
            return results

    RecordingTransport.kind = kind
    monkeypatch.setitem(TRANSPORTS, kind, RecordingTransport)
    return script


def make_application(slug: str = "shop") -> Application:
    return Application.objects.create(
        name=slug.title(), slug=slug, contact_emails=", ".join(CONTACTS)
    )


def make_destination(
    application: Application, *, ordered: bool = True, **fields: object
) -> Destination:
    """Create an SQS destination: FIFO, which keeps order, or standard."""
    values: dict[str, object] = {
        "application": application,
        "stage": Stage.PROD,
        "kind": Kind.SQS,
        "name": "Orders FIFO" if ordered else "Orders",
        "sqs_queue_url": FIFO_QUEUE_URL if ordered else STANDARD_QUEUE_URL,
        "sqs_fifo": ordered,
        **fields,
    }
    return Destination.objects.create(**values)


def add_event(
    application: Application,
    event_id: str,
    key: str,
    at: datetime,
    *,
    stage: str = Stage.PROD,
) -> Event:
    return Event.objects.create(
        id=event_id,
        application=application,
        stage=stage,
        type="ACCEPT",
        object_key=key,
        time=at,
        data={"channel_order_id": key},
    )


def queue_delivery(
    destination: Destination, event: Event, **fields: object
) -> Delivery:
    """Create a due pending delivery of `event`, as publishing does."""
    now = timezone.now()
    values: dict[str, object] = {
        "event": event,
        "destination": destination,
        "ordering_key": event.object_key if destination.is_ordered else "",
        "event_time": event.time,
        "next_attempt_at": now,
        "scheduled_at": now,
        **fields,
    }
    return Delivery.objects.create(**values)


def queue_events(
    destination: Destination, events: Iterable[tuple[str, str, int]]
) -> dict[str, Delivery]:
    """Create a due delivery per (event id, key, seconds after BASE_TIME), in the
    order given, and return them by event id."""
    deliveries = {}
    for event_id, key, seconds in events:
        event = add_event(
            destination.application,
            event_id,
            key,
            BASE_TIME + timedelta(seconds=seconds),
            stage=destination.stage,
        )
        deliveries[event_id] = queue_delivery(destination, event)
    return deliveries


def make_due(deliveries: Iterable[Delivery] | None = None) -> None:
    """Move retries forward to now, as the passing of their delay would."""
    pending = Delivery.objects.filter(status=DeliveryStatus.PENDING)
    if deliveries is not None:
        pending = pending.filter(pk__in=[delivery.pk for delivery in deliveries])
    pending.update(next_attempt_at=timezone.now())


def run_until_idle(worker: str = "worker-1", max_rounds: int = 100) -> int:
    """Run the engine until nothing is due; return how many rounds sent something."""
    for rounds in range(max_rounds):
        if engine.run_once(worker) == 0:
            return rounds
    raise AssertionError(f"Deliveries were still due after {max_rounds} rounds.")


def status_of(delivery: Delivery) -> str:
    delivery.refresh_from_db()
    return delivery.status
