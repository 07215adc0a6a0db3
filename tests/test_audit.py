"""The destination change history: who changed which field from what to what, with
secrets shown only as "changed"."""

import base64
import json
from typing import Any

import pytest
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from destinations.audit import change_lines, diff, snapshot
from destinations.models import Application, Destination, Kind, Stage

pytestmark = pytest.mark.django_db

OLD_QUEUE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders"
NEW_QUEUE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/invoices"
SHARED_ACCESS_KEY = base64.b64encode(b"tests-only-audit-shared-key-0004").decode()
NEW_SHARED_ACCESS_KEY = base64.b64encode(b"tests-only-audit-shared-key-0005").decode()
ENDPOINT = "Endpoint=sb://partner-events.servicebus.windows.net/"
CONNECTION_STRING = (
    f"{ENDPOINT};SharedAccessKeyName=platform-send;SharedAccessKey={SHARED_ACCESS_KEY}"
)
NEW_CONNECTION_STRING = (
    f"{ENDPOINT};SharedAccessKeyName=other-send;SharedAccessKey={NEW_SHARED_ACCESS_KEY}"
)
CHANGELIST_URL = reverse("admin:destinations_destination_changelist")


@pytest.fixture
def application() -> Application:
    return Application.objects.create(name="Shop", slug="shop")


@pytest.fixture
def sqs(application: Application) -> Destination:
    return Destination.objects.create(
        application=application,
        stage=Stage.TEST,
        kind=Kind.SQS,
        name="Orders",
        sqs_queue_url=OLD_QUEUE_URL,
    )


@pytest.fixture
def servicebus(application: Application) -> Destination:
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


@pytest.fixture
def editor(django_user_model: type[User]) -> User:
    return django_user_model.objects.create_superuser(
        username="editor", email="editor@example.com", password="pw-editor-1"
    )


@pytest.fixture
def editor_client(client: Client, editor: User) -> Client:
    client.force_login(editor)
    return client


def sqs_form(destination: Destination, **overrides: str) -> dict[str, str]:
    return {
        "application": str(destination.application_id),
        "stage": destination.stage,
        "kind": Kind.SQS,
        "name": destination.name,
        "enabled": "on",
        "sqs_queue_url": destination.sqs_queue_url,
        "sqs_region": destination.sqs_region,
        "sqs_encryption": destination.sqs_encryption,
        **overrides,
    }


def servicebus_form(destination: Destination, **overrides: str) -> dict[str, str]:
    return {
        "application": str(destination.application_id),
        "stage": destination.stage,
        "kind": Kind.SERVICEBUS,
        "name": destination.name,
        "enabled": "on",
        "servicebus_connection_string": "",
        "servicebus_entity_type": "queue",
        "servicebus_entity_name": destination.servicebus_entity_name,
        "servicebus_max_message_size": "262144",
        **overrides,
    }


def change_url(destination: Destination) -> str:
    return reverse("admin:destinations_destination_change", args=[destination.pk])


def history_url(destination: Destination) -> str:
    return reverse("admin:destinations_destination_history", args=[destination.pk])


def entries(destination: Destination) -> list[LogEntry]:
    return list(
        LogEntry.objects.filter(object_id=str(destination.pk)).order_by("action_time")
    )


def audit_values(entry: LogEntry) -> list[dict[str, Any]]:
    for part in json.loads(entry.change_message):
        if "audit" in part:
            return list(part["audit"]["values"])
    return []


# Changes through the form.


def test_history_shows_old_and_new_queue_url(
    editor_client: Client, sqs: Destination
) -> None:
    response = editor_client.post(
        change_url(sqs), sqs_form(sqs, sqs_queue_url=NEW_QUEUE_URL)
    )
    assert response.status_code == 302

    history = editor_client.get(history_url(sqs))

    assert history.status_code == 200
    assert "editor" in history.text
    assert f"queue URL: {OLD_QUEUE_URL} → {NEW_QUEUE_URL}" in history.text
    assert "Changed queue URL." in history.text


def test_change_entry_records_user_and_values(
    editor_client: Client, editor: User, sqs: Destination
) -> None:
    editor_client.post(change_url(sqs), sqs_form(sqs, sqs_queue_url=NEW_QUEUE_URL))

    [entry] = entries(sqs)
    assert entry.user == editor
    assert entry.action_flag == CHANGE
    assert entry.action_time is not None
    assert audit_values(entry) == [
        {"field": "queue URL", "old": OLD_QUEUE_URL, "new": NEW_QUEUE_URL}
    ]


def test_change_records_derived_columns(
    editor_client: Client, sqs: Destination
) -> None:
    other_region = "https://sqs.us-east-2.amazonaws.com/123456789012/orders"

    editor_client.post(
        change_url(sqs), sqs_form(sqs, sqs_queue_url=other_region, sqs_region="")
    )

    [entry] = entries(sqs)
    assert {"field": "region", "old": "eu-west-1", "new": "us-east-2"} in (
        audit_values(entry)
    )


def test_unchanged_save_records_no_values(
    editor_client: Client, sqs: Destination
) -> None:
    editor_client.post(change_url(sqs), sqs_form(sqs))

    [entry] = entries(sqs)
    assert audit_values(entry) == []
    assert entry.get_change_message() == "No fields changed."


def test_connection_string_change_shows_changed(
    editor_client: Client, servicebus: Destination
) -> None:
    old_token = servicebus.servicebus_connection_string

    response = editor_client.post(
        change_url(servicebus),
        servicebus_form(servicebus, servicebus_connection_string=NEW_CONNECTION_STRING),
    )
    assert response.status_code == 302
    history = editor_client.get(history_url(servicebus))

    servicebus.refresh_from_db()
    assert "connection string: changed" in history.text
    assert "shared access key name: platform-send → other-send" in history.text
    for secret in (
        SHARED_ACCESS_KEY,
        NEW_SHARED_ACCESS_KEY,
        CONNECTION_STRING,
        NEW_CONNECTION_STRING,
        old_token,
        servicebus.servicebus_connection_string,
    ):
        assert secret not in history.text
        assert secret not in entries(servicebus)[0].change_message


def test_blank_connection_string_is_no_change(
    editor_client: Client, servicebus: Destination
) -> None:
    editor_client.post(change_url(servicebus), servicebus_form(servicebus))

    [entry] = entries(servicebus)
    assert audit_values(entry) == []


def test_add_records_values_set(
    editor_client: Client, application: Application
) -> None:
    response = editor_client.post(
        reverse("admin:destinations_destination_add") + "?kind=servicebus",
        {
            "application": str(application.pk),
            "stage": Stage.PROD,
            "kind": Kind.SERVICEBUS,
            "name": "New bus",
            "enabled": "on",
            "servicebus_connection_string": CONNECTION_STRING,
            "servicebus_entity_type": "queue",
            "servicebus_entity_name": "orders",
            "servicebus_max_message_size": "262144",
        },
    )
    assert response.status_code == 302
    destination = Destination.objects.get(name="New bus")

    [entry] = entries(destination)
    values = audit_values(entry)
    assert entry.action_flag == ADDITION
    assert {"field": "name", "new": "New bus"} in values
    assert {"field": "application", "new": "Shop"} in values
    assert {"field": "connection string", "secret": True} in values
    assert SHARED_ACCESS_KEY not in entry.change_message


def test_application_change_shows_names(
    editor_client: Client, sqs: Destination
) -> None:
    other = Application.objects.create(name="Warehouse", slug="warehouse")

    editor_client.post(change_url(sqs), sqs_form(sqs, application=str(other.pk)))

    [entry] = entries(sqs)
    assert {"field": "application", "old": "Shop", "new": "Warehouse"} in (
        audit_values(entry)
    )


# Bulk actions.


def test_bulk_disable_is_recorded(
    editor_client: Client, editor: User, sqs: Destination
) -> None:
    editor_client.post(
        CHANGELIST_URL,
        {"action": "disable_destinations", "_selected_action": [str(sqs.pk)]},
    )

    [entry] = entries(sqs)
    assert entry.user == editor
    assert entry.action_flag == CHANGE
    assert {"field": "enabled", "old": "yes", "new": "no"} in audit_values(entry)
    lines = change_lines(entry)
    assert "By the bulk action “Disable selected destinations”." in lines
    assert "enabled: yes → no" in lines


def test_bulk_enable_is_recorded(editor_client: Client, sqs: Destination) -> None:
    Destination.objects.filter(pk=sqs.pk).update(enabled=False)

    editor_client.post(
        CHANGELIST_URL,
        {"action": "enable_destinations", "_selected_action": [str(sqs.pk)]},
    )

    [entry] = entries(sqs)
    assert {"field": "enabled", "old": "no", "new": "yes"} in audit_values(entry)
    history = editor_client.get(history_url(sqs))
    assert "Enable selected destinations" in history.text
    assert "enabled: no → yes" in history.text


def test_bulk_action_without_change_records_nothing(
    editor_client: Client, sqs: Destination
) -> None:
    editor_client.post(
        CHANGELIST_URL,
        {"action": "enable_destinations", "_selected_action": [str(sqs.pk)]},
    )

    assert entries(sqs) == []


# The diff itself.


def test_diff_masks_secret_columns(servicebus: Destination) -> None:
    before = snapshot(servicebus)
    servicebus.set_connection_string(NEW_CONNECTION_STRING)
    servicebus.save()

    changes = diff(before, snapshot(servicebus))

    assert {"field": "connection string", "secret": True} in changes
    assert NEW_SHARED_ACCESS_KEY not in repr(changes)
    assert before["servicebus_connection_string"] not in repr(changes)


def test_change_lines_ignore_plain_messages(sqs: Destination, editor: User) -> None:
    entry = LogEntry.objects.log_actions(
        editor.pk, [sqs], CHANGE, "Changed by hand.", single_object=True
    )

    assert change_lines(entry) == []
