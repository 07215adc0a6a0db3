"""Secrets at rest: the Fernet column, `rotate_secrets`, and secrets kept out of the
admin's pages and the logs."""

import base64
import html
import logging
import os
import subprocess
import sys
from io import StringIO
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from cryptography.fernet import Fernet
from django.conf import settings as django_settings
from django.contrib.admin.models import LogEntry
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from pytest_django import Settings

from destinations.encryption import EncryptedTextField
from destinations.management.commands.rotate_secrets import encrypted_fields
from destinations.models import Application, Destination, Kind, Stage
from destinations.rotation import SecretRotation
from tests.conftest import TEST_ENCRYPTION_KEY, database_url

pytestmark = pytest.mark.django_db

KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()
KEY_C = Fernet.generate_key().decode()

SHARED_ACCESS_KEY = base64.b64encode(b"tests-only-shared-access-key-001").decode()
NEW_SHARED_ACCESS_KEY = base64.b64encode(b"tests-only-shared-access-key-002").decode()
ENDPOINT = "Endpoint=sb://partner-events.servicebus.windows.net/"
CONNECTION_STRING = (
    f"{ENDPOINT};SharedAccessKeyName=platform-send;SharedAccessKey={SHARED_ACCESS_KEY}"
)
NEW_CONNECTION_STRING = (
    f"{ENDPOINT};SharedAccessKeyName=platform-send;"
    f"SharedAccessKey={NEW_SHARED_ACCESS_KEY}"
)
COLUMN = "destinations.Destination.servicebus_connection_string"


@pytest.fixture
def application() -> Application:
    return Application.objects.create(name="Shop", slug="shop")


def servicebus_destination(
    application: Application, name: str = "Orders bus"
) -> Destination:
    destination = Destination(
        application=application,
        stage=Stage.PROD,
        kind=Kind.SERVICEBUS,
        name=name,
        servicebus_entity_name="orders",
    )
    destination.set_connection_string(CONNECTION_STRING)
    destination.save()
    return destination


def stored_token(destination: Destination) -> str:
    """Return the column's value as stored in the database."""
    return (
        Destination.objects.filter(pk=destination.pk)
        .values_list("servicebus_connection_string", flat=True)
        .get()
    )


def decrypts_with(key: str, token: str) -> str:
    return Fernet(key.encode()).decrypt(token.encode()).decode()


def rotate(*args: str) -> tuple[str, str]:
    """Run rotate_secrets and return its output and error output."""
    stdout, stderr = StringIO(), StringIO()
    call_command("rotate_secrets", *args, stdout=stdout, stderr=stderr)
    return stdout.getvalue(), stderr.getvalue()


def summary(
    rotated: int = 0,
    current: int = 0,
    empty: int = 0,
    failed: int = 0,
    dry_run: bool = False,
) -> str:
    """Return the command's report line for the connection string column."""
    verb = "to rotate" if dry_run else "rotated"
    return (
        f"{COLUMN}: {rotated} {verb}, {current} already current, {empty} empty, "
        f"{failed} failed, 0 changed during the run"
    )


# The encrypted column.


def test_saved_connection_string_is_encrypted(application: Application) -> None:
    destination = servicebus_destination(application)

    token = stored_token(destination)

    assert token != CONNECTION_STRING
    assert CONNECTION_STRING not in token
    assert SHARED_ACCESS_KEY not in token
    assert TEST_ENCRYPTION_KEY not in token
    assert destination.connection_string() == CONNECTION_STRING


def test_token_contains_no_encryption_key(
    settings: Settings, application: Application
) -> None:
    settings.ENCRYPTION_KEYS = [KEY_A]
    destination = servicebus_destination(application)

    token = stored_token(destination)

    assert KEY_A not in token
    assert base64.urlsafe_b64decode(KEY_A) not in base64.urlsafe_b64decode(token)
    assert decrypts_with(KEY_A, token) == CONNECTION_STRING


def test_loaded_destination_keeps_token(application: Application) -> None:
    destination = servicebus_destination(application)

    loaded = Destination.objects.get(pk=destination.pk)

    assert loaded.servicebus_connection_string == stored_token(destination)
    assert loaded.connection_string() == CONNECTION_STRING


def test_plaintext_never_reaches_sql(application: Application) -> None:
    with CaptureQueriesContext(connection) as queries:
        destination = servicebus_destination(application)
        Destination.objects.get(pk=destination.pk).save()

    statements = " ".join(query["sql"] for query in queries.captured_queries)
    assert "INSERT" in statements.upper()
    assert SHARED_ACCESS_KEY not in statements
    assert CONNECTION_STRING not in statements


def test_encrypted_fields_finds_connection_string() -> None:
    found = list(encrypted_fields())

    column = Destination._meta.get_field("servicebus_connection_string")
    assert (Destination, column) in found
    assert all(isinstance(field, EncryptedTextField) for _, field in found)
    assert len(found) == len(set(found))


# rotate_secrets.


def test_rotation_moves_token_to_new_key(
    settings: Settings, application: Application
) -> None:
    settings.ENCRYPTION_KEYS = [KEY_A]
    destination = servicebus_destination(application)
    old_token = stored_token(destination)
    settings.ENCRYPTION_KEYS = [KEY_B, KEY_A]

    output, errors = rotate()

    new_token = stored_token(destination)
    assert new_token != old_token
    assert decrypts_with(KEY_B, new_token) == CONNECTION_STRING
    assert summary(rotated=1) in output
    assert errors == ""
    settings.ENCRYPTION_KEYS = [KEY_B]
    destination.refresh_from_db()
    assert destination.connection_string() == CONNECTION_STRING


def test_rotation_counts_empty_and_current(
    settings: Settings, application: Application
) -> None:
    settings.ENCRYPTION_KEYS = [KEY_B]
    current = servicebus_destination(application, name="Current")
    current_token = stored_token(current)
    Destination.objects.create(
        application=application,
        stage=Stage.TEST,
        kind=Kind.SQS,
        name="Queue",
        sqs_queue_url="https://sqs.eu-west-1.amazonaws.com/123456789012/orders",
    )
    settings.ENCRYPTION_KEYS = [KEY_B, KEY_A]

    output, _ = rotate()

    assert summary(current=1, empty=1) in output
    assert stored_token(current) == current_token


def test_second_rotation_writes_nothing(
    settings: Settings, application: Application
) -> None:
    settings.ENCRYPTION_KEYS = [KEY_A]
    destination = servicebus_destination(application)
    settings.ENCRYPTION_KEYS = [KEY_B, KEY_A]
    rotate()
    rotated_token = stored_token(destination)

    output, _ = rotate()

    assert summary(current=1) in output
    assert stored_token(destination) == rotated_token


def test_rotation_reports_undecryptable_row(
    settings: Settings, application: Application
) -> None:
    settings.ENCRYPTION_KEYS = [KEY_C]
    lost = servicebus_destination(application, name="Lost key")
    lost_token = stored_token(lost)
    settings.ENCRYPTION_KEYS = [KEY_A]
    readable = servicebus_destination(application, name="Readable")
    settings.ENCRYPTION_KEYS = [KEY_B, KEY_A]
    stdout, stderr = StringIO(), StringIO()

    with pytest.raises(CommandError) as raised:
        call_command("rotate_secrets", stdout=stdout, stderr=stderr)

    output = f"{stdout.getvalue()}\n{stderr.getvalue()}\n{raised.value}"
    assert f"{COLUMN} of primary key {lost.pk} cannot be decrypted" in output
    assert f"primary key {readable.pk} " not in output
    assert summary(rotated=1, failed=1) in output
    assert "Cannot decrypt 1 value with any key" in str(raised.value)
    assert stored_token(lost) == lost_token
    assert decrypts_with(KEY_B, stored_token(readable)) == CONNECTION_STRING
    assert lost_token not in output
    assert SHARED_ACCESS_KEY not in output


@pytest.mark.django_db(transaction=True)
def test_rotation_exit_status_is_one(
    settings: Settings, application: Application
) -> None:
    settings.ENCRYPTION_KEYS = [KEY_C]
    lost = servicebus_destination(application)
    environment = {
        **os.environ,
        # The developer's .env must not override what the test passes.
        "ENV_FILE": "",
        "DATABASE_URL": database_url(django_settings.DATABASES["default"]),
        "ENCRYPTION_KEYS": f"{KEY_B},{KEY_A}",
    }

    result = subprocess.run(
        [sys.executable, "manage.py", "rotate_secrets"],
        cwd=django_settings.BASE_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 1
    assert f"{COLUMN} of primary key {lost.pk} cannot be decrypted" in result.stderr
    assert "CommandError: Cannot decrypt 1 value" in result.stderr
    assert summary(failed=1) in result.stdout


def test_dry_run_writes_nothing(settings: Settings, application: Application) -> None:
    settings.ENCRYPTION_KEYS = [KEY_A]
    destination = servicebus_destination(application)
    old_token = stored_token(destination)
    settings.ENCRYPTION_KEYS = [KEY_B, KEY_A]

    with CaptureQueriesContext(connection) as queries:
        output, _ = rotate("--dry-run")

    writes = [
        query["sql"]
        for query in queries.captured_queries
        if query["sql"].lstrip().upper().startswith(("UPDATE", "INSERT", "DELETE"))
    ]
    assert writes == []
    assert stored_token(destination) == old_token
    assert summary(rotated=1, dry_run=True) in output
    assert "Dry run: nothing was written." in output


def test_small_batches_rotate_every_row(
    settings: Settings, application: Application
) -> None:
    settings.ENCRYPTION_KEYS = [KEY_A]
    destinations = [
        servicebus_destination(application, name=f"Bus {number}") for number in range(5)
    ]
    settings.ENCRYPTION_KEYS = [KEY_B, KEY_A]

    output, _ = rotate("--batch-size", "2")

    assert summary(rotated=5) in output
    for destination in destinations:
        assert decrypts_with(KEY_B, stored_token(destination)) == CONNECTION_STRING


def test_batch_size_below_one_rejected() -> None:
    with pytest.raises(CommandError) as raised:
        rotate("--batch-size", "0")

    assert "--batch-size must be 1 or more, not 0" in str(raised.value)


def test_concurrent_edit_is_not_overwritten(
    settings: Settings,
    application: Application,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.ENCRYPTION_KEYS = [KEY_A]
    destination = servicebus_destination(application)
    settings.ENCRYPTION_KEYS = [KEY_B, KEY_A]
    edited_token = Fernet(KEY_B.encode()).encrypt(NEW_CONNECTION_STRING.encode())
    original_rotate_token = SecretRotation.rotate_token

    def rotate_during_edit(rotation: SecretRotation, token: str) -> str:
        # Another process saves a new secret between the command's read and write.
        Destination.objects.filter(pk=destination.pk).update(
            servicebus_connection_string=edited_token.decode()
        )
        return original_rotate_token(rotation, token)

    monkeypatch.setattr(SecretRotation, "rotate_token", rotate_during_edit)

    output, _ = rotate()

    assert stored_token(destination) == edited_token.decode()
    assert f"{COLUMN}: 0 rotated" in output
    assert "1 changed during the run" in output
    assert "1 value changed while this command ran" in output


def test_rotation_rejects_missing_keys(settings: Settings) -> None:
    settings.ENCRYPTION_KEYS = []

    with pytest.raises(CommandError) as raised:
        rotate()

    assert "destinations.E001" in str(raised.value)
    assert "ENCRYPTION_KEYS is not set" in str(raised.value)


def test_rotation_rejects_malformed_key(
    settings: Settings, application: Application
) -> None:
    settings.ENCRYPTION_KEYS = [KEY_A]
    destination = servicebus_destination(application)
    token = stored_token(destination)
    settings.ENCRYPTION_KEYS = [KEY_B, KEY_A[:-2]]

    with pytest.raises(CommandError) as raised:
        rotate()

    assert "destinations.E002" in str(raised.value)
    assert "entry 2" in str(raised.value)
    assert KEY_A[:-2] not in str(raised.value)
    assert stored_token(destination) == token


# The secret stays out of every admin page and log.


def leaked_forms(secret: str) -> dict[str, str]:
    """Return `secret` as it could appear in a page: raw, HTML- or URL-escaped."""
    return {
        "as typed": secret,
        "HTML-escaped": html.escape(secret),
        "URL-quoted": quote(secret, safe=""),
        "form-quoted": quote_plus(secret),
    }


def assert_no_secret(where: str, text: str, secrets: dict[str, str]) -> None:
    for label, secret in secrets.items():
        for form, value in leaked_forms(secret).items():
            assert value not in text, f"{where} shows the {label} {form}"


def servicebus_form(application_pk: int, **overrides: str) -> dict[str, str]:
    return {
        "application": str(application_pk),
        "stage": Stage.PROD,
        "kind": Kind.SERVICEBUS,
        "name": "Orders bus",
        "enabled": "on",
        "servicebus_connection_string": CONNECTION_STRING,
        "servicebus_entity_type": "queue",
        "servicebus_entity_name": "orders",
        "servicebus_max_message_size": "262144",
        **overrides,
    }


@pytest.fixture
def staff_client(client: Client, django_user_model: Any) -> Client:
    django_user_model.objects.create_superuser(
        username="root", email="root@example.com", password="pw-root-1-tests"
    )
    assert client.login(username="root", password="pw-root-1-tests")
    return client


def admin_pages(
    staff_client: Client, destination: Destination
) -> dict[str, tuple[int, str]]:
    """GET every admin page that shows `destination`; return status and body by
    page."""
    changelist = reverse("admin:destinations_destination_changelist")
    application_pk = destination.application_id
    urls = {
        "destination changelist": changelist,
        "destination search by key name": f"{changelist}?q=platform-send",
        "destination search by namespace": f"{changelist}?q=partner-events",
        "destination change page": reverse(
            "admin:destinations_destination_change", args=[destination.pk]
        ),
        "destination history": reverse(
            "admin:destinations_destination_history", args=[destination.pk]
        ),
        "destination delete page": reverse(
            "admin:destinations_destination_delete", args=[destination.pk]
        ),
        "application changelist": reverse("admin:destinations_application_changelist"),
        "application change page": reverse(
            "admin:destinations_application_change", args=[application_pk]
        ),
        "application history": reverse(
            "admin:destinations_application_history", args=[application_pk]
        ),
        "admin index": reverse("admin:index"),
        "destinations app index": reverse(
            "admin:app_list", kwargs={"app_label": "destinations"}
        ),
    }

    # Every choice of every list filter, as the changelist's sidebar links them.
    listing = staff_client.get(changelist)
    changelist_view = listing.context["cl"]
    for spec in changelist_view.filter_specs:
        for choice in spec.choices(changelist_view):
            query = choice["query_string"]
            urls[f"destination changelist filtered by {query}"] = f"{changelist}{query}"

    pages = {}
    for name, url in urls.items():
        response = staff_client.get(url)
        pages[name] = (response.status_code, response.text)
    return pages


def test_admin_pages_never_show_secret(staff_client: Client) -> None:
    response = staff_client.post(
        reverse("admin:destinations_application_add"),
        {"name": "Shop", "slug": "shop", "contact_emails": "ops@example.com"},
        follow=True,
    )
    pages: dict[str, tuple[int, str]] = {
        "application added": (response.status_code, response.text)
    }
    application = Application.objects.get(slug="shop")

    add_url = reverse("admin:destinations_destination_add") + "?kind=servicebus"
    response = staff_client.post(add_url, servicebus_form(application.pk), follow=True)
    pages["destination added"] = (response.status_code, response.text)
    destination = Destination.objects.get(name="Orders bus")
    first_token = stored_token(destination)
    assert destination.connection_string() == CONNECTION_STRING

    # A failed add and a failed change, each with a new secret typed: the form
    # comes back with errors and must not echo the secret.
    response = staff_client.post(
        add_url,
        servicebus_form(
            application.pk,
            name="Invalid bus",
            servicebus_connection_string=NEW_CONNECTION_STRING,
            servicebus_entity_name="orders?bad",
        ),
    )
    assert response.status_code == 200
    assert "servicebus_entity_name" in response.context["adminform"].form.errors
    pages["add page after invalid entity name"] = (200, response.text)

    change_url = reverse("admin:destinations_destination_change", args=[destination.pk])
    response = staff_client.post(
        change_url,
        servicebus_form(
            application.pk,
            servicebus_connection_string=NEW_CONNECTION_STRING,
            servicebus_entity_name="orders?bad",
        ),
    )
    assert response.status_code == 200
    assert "servicebus_entity_name" in response.context["adminform"].form.errors
    pages["change page after invalid entity name"] = (200, response.text)

    response = staff_client.post(
        change_url,
        servicebus_form(
            application.pk,
            servicebus_connection_string=f"{NEW_CONNECTION_STRING};Extra=x",
        ),
    )
    assert response.status_code == 200
    assert "servicebus_connection_string" in response.context["adminform"].form.errors
    pages["change page after invalid connection string"] = (200, response.text)
    assert stored_token(destination) == first_token

    # A successful change with a new secret, so the history contains a change too.
    response = staff_client.post(
        change_url,
        servicebus_form(
            application.pk, servicebus_connection_string=NEW_CONNECTION_STRING
        ),
        follow=True,
    )
    pages["destination changed"] = (response.status_code, response.text)
    destination.refresh_from_db()
    assert destination.connection_string() == NEW_CONNECTION_STRING

    changelist = reverse("admin:destinations_destination_changelist")
    response = staff_client.post(
        changelist,
        {"action": "disable_destinations", "_selected_action": [str(destination.pk)]},
        follow=True,
    )
    pages["changelist after bulk disable"] = (response.status_code, response.text)
    response = staff_client.post(
        changelist,
        {"action": "delete_selected", "_selected_action": [str(destination.pk)]},
    )
    pages["bulk delete confirmation"] = (response.status_code, response.text)

    pages |= admin_pages(staff_client, destination)

    secrets = {
        "SharedAccessKey": SHARED_ACCESS_KEY,
        "new SharedAccessKey": NEW_SHARED_ACCESS_KEY,
        "connection string": CONNECTION_STRING,
        "new connection string": NEW_CONNECTION_STRING,
        "first stored token": first_token,
        "stored token": stored_token(destination),
    }
    for name, (status, text) in pages.items():
        assert status == 200, f"{name} answered {status}"
        assert_no_secret(name, text, secrets)

    assert "Recent actions" in pages["admin index"][1]
    assert str(destination) in pages["admin index"][1]
    assert (
        "partner-events.servicebus.windows.net" in pages["destination change page"][1]
    )

    entries = LogEntry.objects.all()
    assert entries.count() >= 3
    for entry in entries:
        where = f"log entry {entry.pk}"
        assert_no_secret(where, entry.change_message, secrets)
        assert_no_secret(where, entry.get_change_message(), secrets)
        assert_no_secret(where, entry.object_repr, secrets)


def test_admin_marks_secret_sensitive(
    staff_client: Client, application: Application
) -> None:
    add_url = reverse("admin:destinations_destination_add") + "?kind=servicebus"

    response = staff_client.post(add_url, servicebus_form(application.pk))

    # Django's error reports mask these POST parameters.
    assert response.status_code == 302
    sensitive = response.wsgi_request.sensitive_post_parameters  # type: ignore[attr-defined]
    assert "servicebus_connection_string" in sensitive


def test_logs_never_contain_secret(
    staff_client: Client,
    application: Application,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for logger in (None, "django", "destinations", "delivery", "django.db.backends"):
        caplog.set_level(logging.DEBUG, logger=logger)

    # Forcing the debug cursor makes Django log every SQL statement with its
    # parameters, as it does under DEBUG=True.
    with CaptureQueriesContext(connection):
        destination = servicebus_destination(application)
        token = stored_token(destination)
        staff_client.post(
            reverse("admin:destinations_destination_add") + "?kind=servicebus",
            servicebus_form(application.pk, name="Admin bus"),
        )
        staff_client.post(
            reverse("admin:destinations_destination_change", args=[destination.pk]),
            servicebus_form(
                application.pk,
                servicebus_connection_string=NEW_CONNECTION_STRING,
                servicebus_entity_name="orders?bad",
            ),
        )

    assert Destination.objects.filter(name="Admin bus").exists()
    # The SQL log holds the token, which shows the capture saw the INSERT.
    assert any(record.name == "django.db.backends" for record in caplog.records)
    assert token in caplog.text
    logged = "\n".join([caplog.text, *(str(record.args) for record in caplog.records)])
    secrets = {
        "SharedAccessKey": SHARED_ACCESS_KEY,
        "new SharedAccessKey": NEW_SHARED_ACCESS_KEY,
        "connection string": CONNECTION_STRING,
        "new connection string": NEW_CONNECTION_STRING,
    }
    assert_no_secret("the log", logged, secrets)
