"""Demo data for the local run command: a login, an application, and a TEST
destination of each kind on the local peers."""

import secrets
from dataclasses import dataclass

from django.contrib.auth import get_user_model

from .models import Application, Destination, EntityType, Kind, Stage

# Moto's default account id; the queue URLs use the AWS form that validation
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
        slug="demo-shop",
        defaults={"name": "Demo Shop", "contact_emails": "partner@example.com"},
    )
    for name, queue in SQS_QUEUES.items():
        _ensure(
            application,
            name,
            kind=Kind.SQS,
            sqs_queue_url=queue_url(queue),
            sqs_fifo=queue.endswith(".fifo"),
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
