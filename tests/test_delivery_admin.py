"""The staff admin's delivery actions: replay with a confirmation page, retry of
failed deliveries, enabling with held deliveries, the "waiting" status, and the
permissions these actions need."""

import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from django.contrib.auth.models import Permission, User
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from delivery import bulk
from delivery.models import BulkJob, Delivery, DeliveryStatus, Event
from destinations.models import Application, Destination, State

from .delivery_doubles import (
    make_application,
    make_destination,
    queue_events,
    status_of,
)

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse as Response

pytestmark = pytest.mark.django_db

DESTINATIONS_URL = reverse("admin:destinations_destination_changelist")
DELIVERIES_URL = reverse("admin:delivery_delivery_changelist")
KEY_A = "4102/st-1/order/a"
KEY_B = "4102/st-1/order/b"
WAITING = "Waiting for an earlier event of the same object"
# A replay range of one minute from the tests' BASE_TIME, in the form's UTC.
RANGE = {"replay-start": "2025-03-03 08:00:00", "replay-end": "2025-03-03 08:01:00"}


@pytest.fixture
def application() -> Application:
    return make_application()


@pytest.fixture
def fifo(application: Application) -> Destination:
    return make_destination(application)


@pytest.fixture
def delivered(fifo: Destination) -> dict[str, Delivery]:
    """Two delivered events inside RANGE and one after it."""
    deliveries = queue_events(
        fifo, [("a1", KEY_A, 10), ("a2", KEY_A, 20), ("late", KEY_B, 120)]
    )
    Delivery.objects.update(status=DeliveryStatus.DELIVERED, next_attempt_at=None)
    return deliveries


@pytest.fixture
def viewer(django_user_model: type[User]) -> Client:
    """A staff user who may only view destinations, events and deliveries."""
    user = django_user_model.objects.create_user(
        username="viewer", password="unused-password-1", is_staff=True
    )
    codenames = ["view_destination", "view_application", "view_delivery", "view_event"]
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def run_action(
    client: Client, url: str, action: str, objects: list[Any], **fields: str
) -> "Response":
    data = {
        "action": action,
        "_selected_action": [str(item.pk) for item in objects],
        **fields,
    }
    return client.post(url, data)


def messages_of(response: "Response") -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def status_cells(response: "Response") -> list[str]:
    return re.findall(r'<td class="field-shown_status">(.*?)</td>', response.text)


def statuses() -> dict[str, str]:
    return dict(Delivery.objects.values_list("event_id", "status"))


# Replaying events.


def test_replay_action_asks_for_range(
    admin_client: Client, fifo: Destination, delivered: dict[str, Delivery]
) -> None:
    response = run_action(
        admin_client, DESTINATIONS_URL, "replay_events", [fifo], index="0"
    )

    assert response.status_code == 200
    assert 'name="replay-start"' in response.text
    assert "Count the events" in response.text
    assert set(statuses().values()) == {DeliveryStatus.DELIVERED}


def test_replay_action_states_count(
    admin_client: Client, fifo: Destination, delivered: dict[str, Delivery]
) -> None:
    response = run_action(
        admin_client, DESTINATIONS_URL, "replay_events", [fifo], **RANGE
    )

    assert response.status_code == 200
    assert "This sends <strong>2</strong> events again" in response.text
    assert "Yes, replay 2 events" in response.text
    assert set(statuses().values()) == {DeliveryStatus.DELIVERED}


def test_replay_confirm_requeues_range(
    admin_client: Client, fifo: Destination, delivered: dict[str, Delivery]
) -> None:
    response = run_action(
        admin_client,
        DESTINATIONS_URL,
        "replay_events",
        [fifo],
        confirm="Yes, replay 2 events",
        **RANGE,
    )

    assert response.status_code == 302
    assert messages_of(response) == ["Replaying 2 events to 1 destination."]
    assert statuses() == {
        "a1": DeliveryStatus.PENDING,
        "a2": DeliveryStatus.PENDING,
        "late": DeliveryStatus.DELIVERED,
    }


def test_replay_rejects_end_before_start(
    admin_client: Client, fifo: Destination, delivered: dict[str, Delivery]
) -> None:
    response = run_action(
        admin_client,
        DESTINATIONS_URL,
        "replay_events",
        [fifo],
        confirm="Yes, replay 2 events",
        **{"replay-start": "2025-03-03 09:00", "replay-end": "2025-03-03 08:00"},
    )

    assert response.status_code == 200
    assert "The end (2025-03-03 08:00) is not after the start" in response.text
    assert "(2025-03-03 09:00)" in response.text
    assert set(statuses().values()) == {DeliveryStatus.DELIVERED}


@pytest.mark.parametrize("confirm", [{}, {"confirm": "yes"}], ids=["count", "confirm"])
def test_replay_rejects_out_of_range_time(
    admin_client: Client,
    fifo: Destination,
    delivered: dict[str, Delivery],
    confirm: dict[str, str],
) -> None:
    start, end = "0001-01-01 00:00+01:00", "9999-12-31 23:59-01:00"

    response = run_action(
        admin_client,
        DESTINATIONS_URL,
        "replay_events",
        [fifo],
        **{"replay-start": start, "replay-end": end, **confirm},
    )

    assert response.status_code == 200
    errors = response.context["form"].errors
    assert repr(start) in errors["start"][0]
    assert repr(end) in errors["end"][0]
    assert set(statuses().values()) == {DeliveryStatus.DELIVERED}


# Event pages.


@pytest.mark.skipif(
    connection.vendor == "postgresql",
    reason="PostgreSQL's jsonb rejects lone surrogates, so no such event exists",
)
def test_event_page_escapes_stored_lone_surrogate(
    admin_client: Client, delivered: dict[str, Delivery]
) -> None:
    # Recorded before publishing rejected lone surrogates: SQLite keeps the escape.
    event = delivered["a1"].event
    Event.objects.filter(pk=event.pk).update(data={"note": "a\ud800"})
    url = reverse("admin:delivery_event_change", args=[event.pk])

    response = admin_client.get(url)

    assert response.status_code == 200
    assert '{"note": "a\\ud800"}' in response.text.replace("&quot;", '"')


def test_event_page_shows_data(
    admin_client: Client, delivered: dict[str, Delivery]
) -> None:
    event = delivered["a1"].event
    Event.objects.filter(pk=event.pk).update(data={"note": "café"})
    url = reverse("admin:delivery_event_change", args=[event.pk])

    response = admin_client.get(url)

    assert response.status_code == 200
    assert '{"note": "café"}' in response.text.replace("&quot;", '"')


# Retrying failed deliveries.


def test_destination_retry_reports_count(
    admin_client: Client, fifo: Destination
) -> None:
    queue_events(fifo, [("f1", KEY_A, 1), ("f2", KEY_B, 2), ("ok", "k", 3)])
    Delivery.objects.exclude(event_id="ok").update(status=DeliveryStatus.FAILED)

    response = run_action(
        admin_client, DESTINATIONS_URL, "retry_failed_deliveries", [fifo], index="0"
    )
    job = BulkJob.objects.get()
    bulk.run(job.pk)
    progress = admin_client.get(response["Location"])

    assert response["Location"] == reverse(
        "admin:delivery_bulkjob_change", args=[job.pk]
    )
    assert "Queued 2 failed deliveries again." in progress.text
    assert statuses() == {
        "f1": DeliveryStatus.PENDING,
        "f2": DeliveryStatus.PENDING,
        "ok": DeliveryStatus.PENDING,
    }


def test_delivery_retry_reports_selected_count(
    admin_client: Client, fifo: Destination
) -> None:
    deliveries = queue_events(fifo, [("failed", KEY_A, 1), ("delivered", KEY_B, 2)])
    Delivery.objects.filter(event_id="failed").update(status=DeliveryStatus.FAILED)
    Delivery.objects.filter(event_id="delivered").update(
        status=DeliveryStatus.DELIVERED
    )

    response = run_action(
        admin_client,
        DELIVERIES_URL,
        "retry_selected",
        list(deliveries.values()),
        index="0",
    )

    assert messages_of(response) == [
        "Queued 1 of 2 selected deliveries again; only failed ones are retried."
    ]
    assert statuses() == {
        "failed": DeliveryStatus.PENDING,
        "delivered": DeliveryStatus.DELIVERED,
    }


# Enabling.


def test_enable_action_releases_held(
    admin_client: Client, application: Application, fifo: Destination
) -> None:
    queue_events(fifo, [("h1", KEY_A, 1), ("h2", KEY_A, 2), ("h3", KEY_B, 3)])
    Delivery.objects.update(status=DeliveryStatus.HELD)
    Destination.objects.filter(pk=fifo.pk).update(paused_at=timezone.now())

    response = run_action(
        admin_client, DESTINATIONS_URL, "enable_destinations", [fifo], index="0"
    )

    fifo.refresh_from_db()
    assert messages_of(response) == [
        "Enabled 1 of 1 selected destinations; 0 already were. Released 3 held "
        "deliveries, to be sent in order."
    ]
    assert fifo.state == State.ACTIVE
    assert set(statuses().values()) == {DeliveryStatus.PENDING}


# The status column.


def test_blocked_delivery_shows_waiting(
    admin_client: Client, fifo: Destination
) -> None:
    deliveries = queue_events(fifo, [("a1", KEY_A, 1), ("a2", KEY_A, 2)])
    Delivery.objects.filter(pk=deliveries["a1"].pk).update(
        next_attempt_at=timezone.now() + timedelta(minutes=5)
    )

    response = admin_client.get(DELIVERIES_URL)

    assert response.status_code == 200
    assert sorted(status_cells(response)) == ["Pending", WAITING]


def test_unordered_delivery_never_waits(admin_client: Client) -> None:
    standard = make_destination(make_application("market"), ordered=False)
    queue_events(standard, [("a1", KEY_A, 1), ("a2", KEY_A, 2)])

    response = admin_client.get(DELIVERIES_URL)

    assert status_cells(response) == ["Pending", "Pending"]


# Permissions.


def test_viewer_cannot_retry_deliveries(viewer: Client, fifo: Destination) -> None:
    delivery = queue_events(fifo, [("failed", KEY_A, 1)])["failed"]
    Delivery.objects.update(status=DeliveryStatus.FAILED)

    listing = viewer.get(DELIVERIES_URL)
    run_action(viewer, DELIVERIES_URL, "retry_selected", [delivery], index="0")

    assert listing.status_code == 200
    assert 'value="retry_selected"' not in listing.text
    assert status_of(delivery) == DeliveryStatus.FAILED


def test_viewer_cannot_retry_destination(viewer: Client, fifo: Destination) -> None:
    delivery = queue_events(fifo, [("failed", KEY_A, 1)])["failed"]
    Delivery.objects.update(status=DeliveryStatus.FAILED)

    listing = viewer.get(DESTINATIONS_URL)
    run_action(viewer, DESTINATIONS_URL, "retry_failed_deliveries", [fifo], index="0")

    assert listing.status_code == 200
    assert 'value="retry_failed_deliveries"' not in listing.text
    assert status_of(delivery) == DeliveryStatus.FAILED


def test_viewer_cannot_replay(
    viewer: Client, fifo: Destination, delivered: dict[str, Delivery]
) -> None:
    listing = viewer.get(DESTINATIONS_URL)
    response = run_action(
        viewer,
        DESTINATIONS_URL,
        "replay_events",
        [fifo],
        confirm="Yes, replay 2 events",
        **RANGE,
    )

    assert listing.status_code == 200
    assert 'value="replay_events"' not in listing.text
    assert "This sends" not in response.content.decode()
    assert set(statuses().values()) == {DeliveryStatus.DELIVERED}
