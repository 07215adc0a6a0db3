"""The staff admin: one form per kind, write-only secrets, columns and actions."""

from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse

from delivery.models import Attempt, BulkJob, Delivery, DeliveryStatus, Outcome
from delivery.testevents import send_test_event
from destinations.models import Application, Destination, Kind, Stage

SECRET_KEY_VALUE = "c2VjcmV0LWtleS12YWx1ZS10aGF0LW11c3Qtbm90LWxlYWs="
CONNECTION_STRING = (
    "Endpoint=sb://partner-events.servicebus.windows.net/;"
    f"SharedAccessKeyName=platform-send;SharedAccessKey={SECRET_KEY_VALUE}"
)
QUEUE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo"

ADD_URL = reverse("admin:destinations_destination_add")
CHANGELIST_URL = reverse("admin:destinations_destination_changelist")

pytestmark = pytest.mark.django_db


@pytest.fixture
def application() -> Application:
    return Application.objects.create(name="Shop", slug="shop")


@pytest.fixture
def sqs_destination(application: Application) -> Destination:
    destination = Destination(
        application=application,
        stage=Stage.TEST,
        kind=Kind.SQS,
        name="Orders",
        sqs_queue_url=QUEUE_URL,
        sqs_fifo=True,
    )
    destination.save()
    return destination


@pytest.fixture
def servicebus_destination(application: Application) -> Destination:
    destination = Destination(
        application=application,
        stage=Stage.PROD,
        kind=Kind.SERVICEBUS,
        name="Bus",
        servicebus_entity_name="orders",
    )
    destination.set_connection_string(CONNECTION_STRING)
    destination.save()
    return destination


def change_url(destination: Destination) -> str:
    return reverse("admin:destinations_destination_change", args=[destination.pk])


def common_form(application: Application, kind: str) -> dict[str, str]:
    return {
        "application": str(application.pk),
        "stage": Stage.TEST,
        "kind": kind,
        "name": "New destination",
        "enabled": "on",
    }


def test_add_without_kind_offers_each_kind(admin_client: Client) -> None:
    response = admin_client.get(ADD_URL)

    assert response.status_code == 200
    for kind in Kind.values:
        assert f"kind={kind}" in response.text


@pytest.mark.parametrize(
    ("kind", "shown", "hidden"),
    [
        (Kind.SQS, "sqs_queue_url", ("pubsub_topic_id", "servicebus_entity_name")),
        (Kind.PUBSUB, "pubsub_topic_id", ("sqs_queue_url", "servicebus_entity_name")),
        (
            Kind.SERVICEBUS,
            "servicebus_connection_string",
            ("sqs_queue_url", "pubsub_topic_id"),
        ),
    ],
)
def test_add_form_shows_only_its_kind(
    admin_client: Client, kind: str, shown: str, hidden: tuple[str, ...]
) -> None:
    response = admin_client.get(ADD_URL, {"kind": kind})

    assert response.status_code == 200
    assert f'name="{shown}"' in response.text
    for name in hidden:
        assert f'name="{name}"' not in response.text


def test_add_sqs_destination_fills_region(
    admin_client: Client, application: Application
) -> None:
    form = common_form(application, Kind.SQS)
    form |= {"sqs_queue_url": QUEUE_URL, "sqs_fifo": "on", "sqs_encryption": "none"}

    response = admin_client.post(f"{ADD_URL}?kind=sqs", form)

    assert response.status_code == 302
    destination = Destination.objects.get(name="New destination")
    assert destination.kind == Kind.SQS
    assert destination.sqs_region == "eu-west-1"


def test_add_invalid_queue_url_shows_field_error(
    admin_client: Client, application: Application
) -> None:
    form = common_form(application, Kind.SQS)
    form |= {"sqs_queue_url": "https://example.com/queue", "sqs_encryption": "none"}

    response = admin_client.post(f"{ADD_URL}?kind=sqs", form)

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "sqs_queue_url" in errors
    assert "https://example.com/queue" in " ".join(errors["sqs_queue_url"])
    assert not Destination.objects.filter(name="New destination").exists()


def test_ordering_without_endpoint_keeps_own_message(
    admin_client: Client, application: Application
) -> None:
    form = common_form(application, Kind.PUBSUB)
    form |= {
        "pubsub_project_id": "partner-project-1",
        "pubsub_topic_id": "partner-events",
        "pubsub_ordering": "on",
        "pubsub_endpoint": "",
    }

    response = admin_client.post(f"{ADD_URL}?kind=pubsub", form)

    assert response.status_code == 200
    errors = " ".join(response.context["adminform"].form.errors["pubsub_endpoint"])
    assert "Message ordering needs a regional endpoint" in errors
    assert "This field is required." not in errors
    assert not Destination.objects.filter(name="New destination").exists()


def test_add_servicebus_encrypts_connection_string(
    admin_client: Client, application: Application
) -> None:
    form = common_form(application, Kind.SERVICEBUS)
    form |= {
        "servicebus_connection_string": CONNECTION_STRING,
        "servicebus_entity_type": "queue",
        "servicebus_entity_name": "orders",
        "servicebus_max_message_size": "262144",
    }

    response = admin_client.post(f"{ADD_URL}?kind=servicebus", form)

    assert response.status_code == 302
    destination = Destination.objects.get(name="New destination")
    assert SECRET_KEY_VALUE not in destination.servicebus_connection_string
    assert destination.connection_string() == CONNECTION_STRING
    assert destination.servicebus_key_name == "platform-send"


def test_change_with_blank_secret_keeps_stored_one(
    admin_client: Client, servicebus_destination: Destination
) -> None:
    form = common_form(servicebus_destination.application, Kind.SERVICEBUS)
    form |= {
        "stage": Stage.PROD,
        "name": "Bus renamed",
        "servicebus_connection_string": "",
        "servicebus_entity_type": "queue",
        "servicebus_entity_name": "orders",
        "servicebus_max_message_size": "262144",
    }

    response = admin_client.post(change_url(servicebus_destination), form)

    assert response.status_code == 302
    servicebus_destination.refresh_from_db()
    assert servicebus_destination.name == "Bus renamed"
    assert servicebus_destination.connection_string() == CONNECTION_STRING


def test_change_page_hides_secret_and_shows_summary(
    admin_client: Client, servicebus_destination: Destination
) -> None:
    response = admin_client.get(change_url(servicebus_destination))

    assert response.status_code == 200
    assert SECRET_KEY_VALUE not in response.text
    assert servicebus_destination.servicebus_connection_string not in response.text
    assert "partner-events.servicebus.windows.net" in response.text
    assert "platform-send" in response.text


def test_changelist_shows_target_and_last_test(
    admin_client: Client, sqs_destination: Destination
) -> None:
    delivery = send_test_event(sqs_destination, requested_by=None)
    Delivery.objects.filter(pk=delivery.pk).update(status=DeliveryStatus.DELIVERED)
    Attempt.objects.create(
        delivery=delivery,
        started_at=delivery.created_at,
        duration_ms=12,
        outcome=Outcome.SUCCESS,
        remote_message_id="remote-1",
    )

    response = admin_client.get(CHANGELIST_URL)

    assert response.status_code == 200
    assert QUEUE_URL in response.text
    assert "Delivered " in response.text


@pytest.mark.parametrize("filter_query", ["stage__exact=TEST", "kind__exact=sqs"])
def test_changelist_filters_answer(
    admin_client: Client, sqs_destination: Destination, filter_query: str
) -> None:
    response = admin_client.get(f"{CHANGELIST_URL}?{filter_query}")

    assert response.status_code == 200
    assert sqs_destination.name in response.text


def test_bulk_disable_then_enable_reports_counts(
    admin_client: Client,
    sqs_destination: Destination,
    servicebus_destination: Destination,
) -> None:
    Destination.objects.filter(pk=servicebus_destination.pk).update(enabled=False)
    selected = [str(sqs_destination.pk), str(servicebus_destination.pk)]

    response = admin_client.post(
        CHANGELIST_URL,
        {"action": "disable_destinations", "_selected_action": selected},
        follow=True,
    )

    assert "Disabled 1 of 2 selected destinations; 1 already were." in response.text
    assert not Destination.objects.filter(enabled=True).exists()

    response = admin_client.post(
        CHANGELIST_URL,
        {"action": "enable_destinations", "_selected_action": selected},
        follow=True,
    )

    assert "Enabled 2 of 2 selected destinations; 0 already were." in response.text
    assert Destination.objects.filter(enabled=True).count() == 2


def test_bulk_send_test_starts_a_job(
    admin_client: Client,
    sqs_destination: Destination,
    servicebus_destination: Destination,
    django_capture_on_commit_callbacks: Any,
) -> None:
    selected = [str(sqs_destination.pk), str(servicebus_destination.pk)]

    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(
            CHANGELIST_URL,
            {"action": "send_test_events", "_selected_action": selected},
        )

    job = BulkJob.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse(
        "admin:delivery_bulkjob_change", args=[job.pk]
    )
    assert job.destination_ids == sorted(int(pk) for pk in selected)
    assert len(callbacks) == 1
    assert not Delivery.objects.exists()


def test_send_test_button_needs_post(
    admin_client: Client, sqs_destination: Destination
) -> None:
    url = reverse("admin:destinations_destination_send_test", args=[sqs_destination.pk])

    assert admin_client.get(url).status_code == 405
    assert not Delivery.objects.exists()


def test_send_test_button_queues_one_delivery(
    admin_client: Client,
    sqs_destination: Destination,
    django_capture_on_commit_callbacks: Any,
) -> None:
    url = reverse("admin:destinations_destination_send_test", args=[sqs_destination.pk])

    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(url)

    assert response.status_code == 302
    assert response["Location"] == change_url(sqs_destination)
    assert Delivery.objects.filter(destination=sqs_destination).count() == 1
    assert len(callbacks) == 1
    page = admin_client.get(change_url(sqs_destination))
    assert "waiting for the worker" in page.text


def test_send_test_button_rejects_view_only_staff(
    client: Client, sqs_destination: Destination
) -> None:
    user = User.objects.create_user("viewer", password="pw-viewer-1", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_destination"))
    client.force_login(user)
    url = reverse("admin:destinations_destination_send_test", args=[sqs_destination.pk])

    response = client.post(url)

    assert response.status_code == 403
    assert not Delivery.objects.exists()


def test_send_test_button_unknown_destination_redirects(admin_client: Client) -> None:
    url = reverse("admin:destinations_destination_send_test", args=[999999])

    response = admin_client.post(url)

    assert response.status_code == 302
    assert not Delivery.objects.exists()
