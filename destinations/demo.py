"""Demo data for the local run command: a login, an application, its destinations."""

import secrets
from dataclasses import dataclass

from django.contrib.auth import get_user_model

from .models import Application, Destination, Kind, Stage

# Moto's default account id; the queue URLs below use the AWS form that the
# validation requires, and the SQS endpoint override sends them to the local peer.
DEMO_ACCOUNT = "123456789012"
DEMO_REGION = "eu-west-1"
DEMO_QUEUES = {
    "Orders (SQS FIFO, local peer)": "demo-orders.fifo",
    "Catalogue (SQS standard, local peer)": "demo-catalogue",
}


@dataclass(frozen=True)
class DemoLogin:
    username: str
    password: str


def queue_url(name: str) -> str:
    return f"https://sqs.{DEMO_REGION}.amazonaws.com/{DEMO_ACCOUNT}/{name}"


def seed_demo() -> DemoLogin:
    """Create the demo data if missing, and give the demo login a new password.

    The password changes on every start so that none is ever written to a file.
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
    for name, queue in DEMO_QUEUES.items():
        if not Destination.objects.filter(application=application, name=name).exists():
            Destination(
                application=application,
                stage=Stage.TEST,
                kind=Kind.SQS,
                name=name,
                sqs_queue_url=queue_url(queue),
                sqs_fifo=queue.endswith(".fifo"),
            ).save()

    return DemoLogin(username=user.username, password=password)
