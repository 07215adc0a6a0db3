"""Demo data for the local run command: a login, an application, and a TEST
destination of each kind on the local peers. For the status pages, it also adds an
app developer login and a week of delivery history."""

import math
import random
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from delivery.ids import new_ulid
from delivery.models import (
    Attempt,
    Delivery,
    DeliveryStatus,
    Event,
    NotificationPreference,
    Outcome,
)
from delivery.object_keys import object_key

from .models import (
    Application,
    Destination,
    EntityType,
    Kind,
    SqsEncryption,
    Stage,
)

# Moto's default account id. The queue URLs use the AWS form that validation
# requires, and the stage's SQS endpoint override sends them to the local peer.
DEMO_ACCOUNT = "123456789012"
DEMO_REGION = "eu-west-1"
SQS_QUEUES = {
    "Orders (SQS FIFO)": "demo-orders.fifo",
    "Catalogue (SQS standard)": "demo-catalogue",
}
PUBSUB_PROJECT = "demo-project"
PUBSUB_TOPIC = "demo-orders"
# Ordering needs a regional endpoint; under the local peer it is not dialled.
PUBSUB_ENDPOINT = "europe-west1-pubsub.googleapis.com:443"
PUBSUB_NAME = "Orders (Pub/Sub, ordered)"
SERVICEBUS_QUEUE = "demo-orders"
SERVICEBUS_NAME = "Orders (Service Bus sessions)"
DEMO_SLUG = "demo-shop"
# An entity-level policy with Send only, as the grant instructions ask partners for.
SERVICEBUS_KEY_NAME = "platform-test-send"
# The demo destinations that send; the paused one fails on purpose.
ACTIVE_DESTINATIONS = (*SQS_QUEUES, PUBSUB_NAME, SERVICEBUS_NAME)
DEVELOPER_USERNAME = "developer"
# A queue that the local peer does not have: enabling this destination in the admin
# pauses it again with "queue not found".
PAUSED_NAME = "Legacy queue (paused)"
PAUSED_QUEUE = "demo-legacy"
HISTORY_DAYS = 7
# The mean gap between two demo events: about 840 events over the week.
EVENT_INTERVAL_MINUTES = 12
EVENT_TYPES = ["ACCEPT", "CREATE_SHIPMENT", "PRICE_STOCK_UPSERT"]


@dataclass(frozen=True)
class DemoLogin:
    username: str
    password: str


def queue_url(name: str) -> str:
    return f"https://sqs.{DEMO_REGION}.amazonaws.com/{DEMO_ACCOUNT}/{name}"


def seed_demo(servicebus_connection_string: str) -> DemoLogin:
    """Create the demo data if missing, and give the demo login a new password.

    The password changes on every start so that none is ever written to a file. The
    Service Bus destination gets the connection string of this run's local peer,
    whose key is new on every start.
    """
    user_model = get_user_model()
    user, _ = user_model.objects.get_or_create(
        username="admin", defaults={"email": "admin@example.com"}
    )
    password = secrets.token_urlsafe(12)
    user.is_staff = True
    user.is_superuser = True
    user.set_password(password)
    user.save()

    application, _ = Application.objects.get_or_create(
        slug=DEMO_SLUG,
        defaults={"name": "Demo Shop", "contact_emails": "partner@example.com"},
    )
    for name, queue in SQS_QUEUES.items():
        _ensure(
            application,
            name,
            kind=Kind.SQS,
            sqs_queue_url=queue_url(queue),
            sqs_fifo=queue.endswith(".fifo"),
            # Queues on the local peer, as new SQS queues, use SSE-SQS by default.
            sqs_encryption=SqsEncryption.SSE_SQS,
        )
    _ensure(
        application,
        PUBSUB_NAME,
        kind=Kind.PUBSUB,
        pubsub_project_id=PUBSUB_PROJECT,
        pubsub_topic_id=PUBSUB_TOPIC,
        pubsub_ordering=True,
        pubsub_endpoint=PUBSUB_ENDPOINT,
    )
    servicebus = _ensure(
        application,
        SERVICEBUS_NAME,
        kind=Kind.SERVICEBUS,
        servicebus_entity_type=EntityType.QUEUE,
        servicebus_entity_name=SERVICEBUS_QUEUE,
        servicebus_sessions=True,
        connection_string=servicebus_connection_string,
    )
    servicebus.set_connection_string(servicebus_connection_string)
    servicebus.save()

    return DemoLogin(username=user.username, password=password)


def _ensure(
    application: Application,
    name: str,
    *,
    connection_string: str = "",
    **fields: object,
) -> Destination:
    destination = Destination.objects.filter(application=application, name=name)
    existing = destination.first()
    if existing is not None:
        return existing
    created = Destination(
        application=application, stage=Stage.TEST, name=name, **fields
    )
    if connection_string:
        created.set_connection_string(connection_string)
    created.save()
    return created


def seed_status_demo() -> DemoLogin:
    """Give the app developer login a new password, and on the first start add a
    paused destination and a week of delivery history to the demo application.

    Call it after `seed_demo`, which creates the application. History is added only
    while the application has no events other than test events, so it never mixes
    with events published by hand.
    """
    application = Application.objects.get(slug=DEMO_SLUG)
    login = _developer(application)
    paused = _ensure(
        application, PAUSED_NAME, kind=Kind.SQS, sqs_queue_url=queue_url(PAUSED_QUEUE)
    )
    if not Event.objects.filter(application=application, is_test=False).exists():
        with transaction.atomic():
            _History(application, paused, timezone.now()).write()
    return login


def _developer(application: Application) -> DemoLogin:
    user_model = get_user_model()
    user, _ = user_model.objects.get_or_create(
        username=DEVELOPER_USERNAME, defaults={"email": "developer@example.com"}
    )
    password = secrets.token_urlsafe(12)
    user.is_staff = False
    user.set_password(password)
    user.save()
    application.developers.add(user)
    # Every notification on, so the console shows what an app developer receives.
    NotificationPreference.objects.get_or_create(
        user=user,
        application=application,
        defaults={
            "on_failing": True,
            "on_paused": True,
            "on_disabled": True,
            "on_recovered": True,
        },
    )
    return DemoLogin(username=user.get_username(), password=password)


@dataclass
class _Outcome:
    """One demo attempt: when, how long, and its error (none for a success)."""

    at: datetime
    duration_ms: int
    error_kind: str = ""
    message: str = ""
    permanent: bool = False


@dataclass
class _History:
    """A week of events of the demo application and their deliveries to its TEST
    destinations: mostly first-time successes, some retried timeouts, a Pub/Sub
    outage of two hours, a few messages too large for SQS, and one destination
    that was paused two days ago because the platform lost access to its queue."""

    application: Application
    paused: Destination
    now: datetime
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def write(self) -> None:
        events = self._events()
        Event.objects.bulk_create(events, batch_size=500)
        destinations = Destination.objects.filter(
            application=self.application, stage=Stage.TEST
        )
        for destination in destinations:
            rows = [self._delivery(destination, event) for event in events]
            Delivery.objects.bulk_create([row[0] for row in rows], batch_size=500)
            attempts = [
                self._attempt(delivery, outcome)
                for delivery, outcomes in rows
                for outcome in outcomes
            ]
            Attempt.objects.bulk_create(attempts, batch_size=500)
            self._set_health(destination, attempts)

    def _events(self) -> list[Event]:
        events: list[Event] = []
        time = self.now - timedelta(days=HISTORY_DAYS)
        while True:
            time += timedelta(minutes=self.rng.expovariate(1 / EVENT_INTERVAL_MINUTES))
            if time >= self.now - timedelta(minutes=5):
                return events
            event_id = new_ulid(int(time.timestamp() * 1000))
            event_type, data = self._payload(time)
            events.append(
                Event(
                    id=event_id,
                    application=self.application,
                    stage=Stage.TEST,
                    type=event_type,
                    object_key=object_key(event_type, data, event_id),
                    time=time,
                    data=data,
                )
            )

    def _payload(self, time: datetime) -> tuple[str, dict[str, Any]]:
        order = f"DEMO-{self.rng.randint(1000, 1060):06d}-A"
        store = self.rng.choice(["st-80231", "st-80232"])
        event_type = self.rng.choice(EVENT_TYPES)
        if event_type == "PRICE_STOCK_UPSERT":
            return event_type, {
                "channel_id": "4102",
                "store_id": store,
                "product_id": f"p-{self.rng.randint(100, 140)}",
                "price": {"amount": self.rng.randint(999, 4999), "currency": "EUR"},
                "stock": self.rng.randint(0, 40),
            }
        return event_type, {
            "action_id": str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            "channel_id": "4102",
            "channel_store_id": store,
            "channel_order_id": order,
            "trigger_date": time.isoformat(),
        }

    def _delivery(
        self, destination: Destination, event: Event
    ) -> tuple[Delivery, list[_Outcome]]:
        if destination.pk == self.paused.pk:
            outcomes, status = self._paused_outcomes(event.time)
        else:
            outcomes = self._outcomes(destination, event.time)
            failed = outcomes and outcomes[-1].error_kind
            status = DeliveryStatus.FAILED if failed else DeliveryStatus.DELIVERED
        delivery = Delivery(
            event=event,
            destination=destination,
            status=status,
            ordering_key=event.object_key if destination.is_ordered else "",
            event_time=event.time,
            attempt_count=len(outcomes),
            next_attempt_at=(
                self.paused.paused_at if status == DeliveryStatus.PENDING else None
            ),
            scheduled_at=event.time,
        )
        return delivery, outcomes

    def _outcomes(self, destination: Destination, time: datetime) -> list[_Outcome]:
        sent = time + timedelta(milliseconds=self.rng.randint(200, 900))
        outage_start = self.now - timedelta(days=1, hours=6)
        outage_end = outage_start + timedelta(hours=2)
        if destination.kind == Kind.PUBSUB and outage_start <= time < outage_end:
            topic = f"projects/{PUBSUB_PROJECT}/topics/{PUBSUB_TOPIC}"
            failure = _Outcome(
                sent,
                self._duration(destination) + 3000,
                "unavailable",
                f"Pub/Sub was unavailable while publishing to topic {topic}: 503 "
                "The service is currently unavailable. The publish will be tried "
                "again.",
            )
            retried = outage_end + timedelta(seconds=self.rng.randint(5, 300))
            return [failure, _Outcome(retried, self._duration(destination))]

        chance = self.rng.random()
        if destination.kind == Kind.SQS and chance < 0.004:
            size = self.rng.randint(262_145, 400_000)
            return [
                _Outcome(
                    sent,
                    self._duration(destination),
                    "too_large",
                    f"The message is {size:,} bytes (body and message attributes, in "
                    f"UTF-8) but queue {destination.sqs_queue_url} accepts at most "
                    "262,144 bytes. Raise the queue's MaximumMessageSize, up to "
                    "1,048,576 bytes.",
                    permanent=True,
                )
            ]
        if chance < 0.03:
            failure = _Outcome(
                sent,
                10_000,
                "timeout",
                f"Sending to {destination.target} timed out after 10 s. The send "
                "can be tried again later.",
            )
            retried = sent + timedelta(seconds=self.rng.randint(5, 40))
            return [failure, _Outcome(retried, self._duration(destination))]
        return [_Outcome(sent, self._duration(destination))]

    def _paused_outcomes(self, time: datetime) -> tuple[list[_Outcome], str]:
        """Successes until the access was lost, then one denied attempt that
        paused the destination; later events are held."""
        paused_at = self.now - timedelta(days=2, hours=3)
        if time < paused_at - timedelta(minutes=30):
            sent = time + timedelta(milliseconds=self.rng.randint(200, 900))
            success = _Outcome(sent, self._duration(self.paused))
            return [success], DeliveryStatus.DELIVERED
        if self.paused.paused_at is None:
            self.paused.paused_at = time + timedelta(seconds=1)
            self.paused.pause_reason = (
                "SQS denied the platform's TEST AWS principal access to queue "
                f"{self.paused.sqs_queue_url} (AccessDenied: User: "
                "arn:aws:iam::123456789012:user/platform-test is not authorized to "
                "perform: sqs:sendmessage on resource: arn:aws:sqs:eu-west-1:"
                f"{DEMO_ACCOUNT}:{PAUSED_QUEUE}). Grant that principal "
                "sqs:SendMessage on the queue in the queue's access policy."
            )
            denied = _Outcome(
                self.paused.paused_at,
                self._duration(self.paused),
                "access_denied",
                self.paused.pause_reason,
                permanent=True,
            )
            # The engine keeps the delivery that was refused first in line.
            return [denied], DeliveryStatus.PENDING
        return [], DeliveryStatus.HELD

    def _duration(self, destination: Destination) -> int:
        typical = {Kind.SQS: 45, Kind.PUBSUB: 30, Kind.SERVICEBUS: 70}[
            Kind(destination.kind)
        ]
        return max(3, round(self.rng.lognormvariate(math.log(typical), 0.5)))

    def _attempt(self, delivery: Delivery, outcome: _Outcome) -> Attempt:
        if not outcome.error_kind:
            result = Outcome.SUCCESS
        elif outcome.permanent:
            result = Outcome.PERMANENT_ERROR
        else:
            result = Outcome.TRANSIENT_ERROR
        return Attempt(
            delivery=delivery,
            started_at=outcome.at,
            duration_ms=outcome.duration_ms,
            outcome=result,
            error_kind=outcome.error_kind,
            message=outcome.message,
            remote_message_id="" if outcome.error_kind else self._message_id(),
        )

    def _message_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _set_health(self, destination: Destination, attempts: list[Attempt]) -> None:
        successes = [a.started_at for a in attempts if a.outcome == Outcome.SUCCESS]
        fields: dict[str, Any] = {"last_success_at": max(successes, default=None)}
        if destination.pk == self.paused.pk and self.paused.paused_at is not None:
            fields.update(
                paused_at=self.paused.paused_at,
                pause_reason=self.paused.pause_reason,
                consecutive_failures=1,
                failing_since=self.paused.paused_at,
                last_error=f"access_denied: {self.paused.pause_reason}",
            )
        # update(), not save(): these are the engine's columns, not a form's.
        Destination.objects.filter(pk=destination.pk).update(**fields)
