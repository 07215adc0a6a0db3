"""Secrets in the staff admin: no lookups or ordering through them, masked in error
pages and exports, and key rotation from the changelist for superusers only."""

import base64
import re
from importlib import import_module
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.apps import apps as django_apps
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from pytest_django import Settings

from delivery.peers.sqs import free_port
from delivery.transports import transport_for
from destinations import encryption
from destinations.access_keys import HIDDEN_KEY_NAME
from destinations.admin import DestinationAdmin
from destinations.audit import audit_message
from destinations.export import rows
from destinations.forms import SECRET_FIELDS
from destinations.masking import (
    EMPTY,
    SECRET_SET,
    is_secret_lookup,
    masked_summary,
    masked_value,
)
from destinations.models import Application, Destination, Kind, Stage

pytestmark = pytest.mark.django_db

SHARED_ACCESS_KEY = base64.b64encode(b"tests-only-secret-admin-key-0003").decode()
CONNECTION_STRING = (
    "Endpoint=sb://partner-events.servicebus.windows.net/;"
    f"SharedAccessKeyName=platform-send;SharedAccessKey={SHARED_ACCESS_KEY}"
)
CHANGELIST_URL = reverse("admin:destinations_destination_changelist")
ROTATE_URL = reverse("admin:destinations_destination_rotate_secrets")
KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()


@pytest.fixture
def application() -> Application:
    return Application.objects.create(name="Shop", slug="shop")


def make_servicebus(application: Application, name: str = "Bus") -> Destination:
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


@pytest.fixture
def servicebus(application: Application) -> Destination:
    return make_servicebus(application)


@pytest.fixture
def sqs(application: Application) -> Destination:
    return Destination.objects.create(
        application=application,
        stage=Stage.TEST,
        kind=Kind.SQS,
        name="Queue",
        sqs_queue_url="https://sqs.eu-west-1.amazonaws.com/123456789012/orders",
    )


@pytest.fixture
def staff_member(django_user_model: type[User]) -> User:
    """A staff user with every destination permission, who is not a superuser."""
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user(
        username="staff", password="pw-staff-1-tests", is_staff=True
    )
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="destinations")
    )
    return user


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in response.context["messages"]]


# Lookups, search and ordering.


@pytest.mark.parametrize(
    "query",
    [
        "servicebus_connection_string__startswith=g",
        "servicebus_connection_string=x",
        "servicebus_connection_string__isnull=False",
        "servicebus_connection_string__regex=%5Eg",
    ],
)
def test_secret_lookup_is_rejected(
    admin_client: Client, servicebus: Destination, query: str
) -> None:
    response = admin_client.get(f"{CHANGELIST_URL}?{query}")

    assert response.status_code == 400


@pytest.mark.parametrize(
    "url",
    [
        reverse("admin:destinations_application_changelist")
        + "?destinations__servicebus_connection_string__startswith=g",
        reverse("admin:delivery_delivery_changelist")
        + "?destination__servicebus_connection_string__startswith=g",
    ],
)
def test_secret_lookup_through_relation_rejected(
    admin_client: Client, servicebus: Destination, url: str
) -> None:
    response = admin_client.get(url)

    assert response.status_code == 400


def test_secret_lookup_check_names_every_form() -> None:
    assert is_secret_lookup("servicebus_connection_string")
    assert is_secret_lookup("servicebus_connection_string__startswith")
    assert is_secret_lookup("destinations__servicebus_connection_string__gt")
    assert not is_secret_lookup("servicebus_namespace__startswith")
    assert not is_secret_lookup("name")


def test_plain_lookup_still_filters(
    admin_client: Client, servicebus: Destination, sqs: Destination
) -> None:
    response = admin_client.get(f"{CHANGELIST_URL}?name__startswith=Q")

    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == [sqs]


def test_search_fields_leave_out_secrets(admin_client: Client) -> None:
    response = admin_client.get(CHANGELIST_URL)

    search_fields = response.context["cl"].search_fields
    assert search_fields
    for name in search_fields:
        assert not is_secret_lookup(name.lstrip("^=@")), name


def test_search_for_token_prefix_finds_nothing(
    admin_client: Client, servicebus: Destination
) -> None:
    token = Destination.objects.values_list(
        "servicebus_connection_string", flat=True
    ).get(pk=servicebus.pk)

    response = admin_client.get(CHANGELIST_URL, {"q": token[:12]})

    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == []


def test_no_changelist_column_orders_by_secret(admin_client: Client) -> None:
    response = admin_client.get(CHANGELIST_URL)

    changelist = response.context["cl"]
    for column in changelist.list_display:
        order_field = changelist.get_ordering_field(column)
        if isinstance(order_field, str):
            assert not is_secret_lookup(order_field.lstrip("-")), column


def test_ordering_parameter_never_uses_secret(
    admin_client: Client, servicebus: Destination, sqs: Destination
) -> None:
    every_column = ".".join(str(index) for index in range(40))

    for order in (every_column, "servicebus_connection_string", "-1.x"):
        response = admin_client.get(CHANGELIST_URL, {"o": order})

        assert response.status_code == 200, order
        ordering = response.context["cl"].get_ordering(
            response.wsgi_request, Destination.objects.all()
        )
        assert not any("connection_string" in str(field) for field in ordering)


def test_secret_ordering_field_is_dropped(
    admin_client: Client, servicebus: Destination
) -> None:
    response = admin_client.get(CHANGELIST_URL)
    changelist = response.context["cl"]

    def secret_column(destination: Destination) -> str:
        return "-"

    secret_column.admin_order_field = "servicebus_connection_string"  # type: ignore[attr-defined]

    assert changelist.get_ordering_field(secret_column) is None


# Masking for exports and the history.


def test_masked_value_hides_secret(servicebus: Destination) -> None:
    value = masked_value(servicebus, "servicebus_connection_string")

    assert value == SECRET_SET
    assert SHARED_ACCESS_KEY not in value


def test_masked_value_of_empty_secret(sqs: Destination) -> None:
    assert masked_value(sqs, "servicebus_connection_string") == EMPTY


def test_masked_value_shows_plain_fields(
    servicebus: Destination, sqs: Destination
) -> None:
    assert masked_value(sqs, "sqs_queue_url") == sqs.sqs_queue_url
    assert masked_value(sqs, "application") == "Shop"
    assert masked_value(sqs, "kind") == "AWS SQS"
    assert masked_value(sqs, "enabled") == "yes"
    assert masked_value(servicebus, "servicebus_key_name") == "platform-send"


def test_masked_summary_has_no_secret(servicebus: Destination) -> None:
    token = Destination.objects.values_list(
        "servicebus_connection_string", flat=True
    ).get(pk=servicebus.pk)

    summary = masked_summary(servicebus)

    text = repr(summary)
    assert summary["servicebus_connection_string"] == SECRET_SET
    assert summary["servicebus_namespace"] == "partner-events.servicebus.windows.net"
    assert SHARED_ACCESS_KEY not in text
    assert CONNECTION_STRING not in text
    assert token not in text


# A key stored as the key name, which validation accepted before it rejected that.


@pytest.fixture
def key_as_key_name(servicebus: Destination) -> Destination:
    """`servicebus` with its key pasted into SharedAccessKeyName, as stored before
    validation rejected such a connection string."""
    text = CONNECTION_STRING.replace("platform-send", SHARED_ACCESS_KEY)
    Destination.objects.filter(pk=servicebus.pk).update(
        servicebus_key_name=SHARED_ACCESS_KEY,
        servicebus_connection_string=encryption.encrypt(text),
    )
    servicebus.refresh_from_db()
    return servicebus


def test_key_as_key_name_hidden_in_summary(key_as_key_name: Destination) -> None:
    summary = key_as_key_name.servicebus_summary

    assert f"(key {HIDDEN_KEY_NAME}, secret hidden)" in summary
    assert SHARED_ACCESS_KEY not in summary
    assert SHARED_ACCESS_KEY not in key_as_key_name.target


def test_key_as_key_name_hidden_in_masked_value(
    key_as_key_name: Destination,
) -> None:
    assert masked_value(key_as_key_name, "servicebus_key_name") == HIDDEN_KEY_NAME


@pytest.mark.parametrize("page", ["change", "changelist", "status"])
def test_key_as_key_name_hidden_on_page(
    admin_client: Client, key_as_key_name: Destination, page: str
) -> None:
    urls = {
        "change": reverse(
            "admin:destinations_destination_change", args=[key_as_key_name.pk]
        ),
        "changelist": CHANGELIST_URL,
        "status": reverse(
            "status:destination",
            args=[
                key_as_key_name.application.slug,
                key_as_key_name.stage,
                key_as_key_name.pk,
            ],
        ),
    }

    response = admin_client.get(urls[page])

    assert response.status_code == 200
    assert HIDDEN_KEY_NAME in response.text
    assert SHARED_ACCESS_KEY not in response.text
    assert SHARED_ACCESS_KEY.rstrip("=") not in response.text


def test_key_as_key_name_hidden_in_export(key_as_key_name: Destination) -> None:
    text = "".join(rows(Destination.objects.all()))

    assert HIDDEN_KEY_NAME in text
    assert SHARED_ACCESS_KEY not in text


def test_key_as_key_name_hidden_in_history(
    admin_client: Client, admin_user: User, key_as_key_name: Destination
) -> None:
    # A history entry written when the key was stored, before values were masked.
    change = {
        "field": "shared access key name",
        "old": "send",
        "new": SHARED_ACCESS_KEY,
    }
    LogEntry.objects.log_actions(
        user_id=admin_user.pk,
        queryset=Destination.objects.filter(pk=key_as_key_name.pk),
        action_flag=CHANGE,
        change_message=audit_message([change]),
    )
    url = reverse("admin:destinations_destination_history", args=[key_as_key_name.pk])

    response = admin_client.get(url)

    assert response.status_code == 200
    assert f"shared access key name: send → {HIDDEN_KEY_NAME}" in response.text
    assert SHARED_ACCESS_KEY not in response.text


def test_key_as_key_name_hidden_in_check(key_as_key_name: Destination) -> None:
    # A local endpoint with no listener, so that a check which got past parsing
    # would fail on 127.0.0.1 instead of reaching a cloud.
    text = (
        f"Endpoint=sb://127.0.0.1:{free_port()}/;SharedAccessKeyName="
        f"{SHARED_ACCESS_KEY};SharedAccessKey={SHARED_ACCESS_KEY};"
        "UseDevelopmentEmulator=true"
    )
    Destination.objects.filter(pk=key_as_key_name.pk).update(
        servicebus_connection_string=encryption.encrypt(text)
    )
    key_as_key_name.refresh_from_db()
    transport = transport_for(key_as_key_name)
    assert transport is not None

    result = transport.check()

    assert not result.ok
    assert result.failure is not None
    assert result.failure.kind == "invalid_connection_string"
    assert "SharedAccessKeyName (not shown) looks like a key" in result.failure.message
    assert SHARED_ACCESS_KEY.rstrip("=") not in result.failure.message


# Error pages.


def test_debug_error_page_masks_posted_secret(
    settings: Settings,
    application: Application,
    django_user_model: type[User],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.DEBUG = True
    django_user_model.objects.create_superuser("root", "root@example.com", "pw-1")
    client = Client(raise_request_exception=False)
    client.force_login(django_user_model.objects.get(username="root"))

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(DestinationAdmin, "save_model", fail)

    response = client.post(
        reverse("admin:destinations_destination_add") + "?kind=servicebus",
        {
            "application": str(application.pk),
            "stage": Stage.PROD,
            "kind": Kind.SERVICEBUS,
            "name": "Bus",
            "enabled": "on",
            "servicebus_connection_string": CONNECTION_STRING,
            "servicebus_entity_type": "queue",
            "servicebus_entity_name": "orders",
            "servicebus_max_message_size": "262144",
        },
    )

    page = response.content.decode()
    assert response.status_code == 500
    assert "the database went away" in page
    assert "servicebus_connection_string" in page
    assert "********************" in page
    assert SHARED_ACCESS_KEY not in page
    assert "SharedAccessKey=" not in page


def test_error_filter_masks_unmarked_view(settings: Settings, rf: Any) -> None:
    from django.views.debug import get_exception_reporter_filter

    settings.DEBUG = True
    request = rf.post("/anywhere/", {"servicebus_connection_string": CONNECTION_STRING})

    parameters = get_exception_reporter_filter(request).get_post_parameters(request)

    assert parameters["servicebus_connection_string"] == "********************"


def test_error_filter_hides_connection_urls(settings: Settings) -> None:
    from django.views.debug import get_exception_reporter_filter

    settings.CELERY_BROKER_URL = "redis://:broker-password@127.0.0.1:6379/0"
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "redis://:cache-password@127.0.0.1:6379/1",
        }
    }

    shown = repr(get_exception_reporter_filter(None).get_safe_settings())

    assert "broker-password" not in shown
    assert "cache-password" not in shown
    assert "ENCRYPTION_KEYS" in shown
    assert settings.ENCRYPTION_KEYS[0] not in shown


@pytest.mark.parametrize("view", ["changeform_view", "rotate_secrets_view"])
def test_secret_views_mark_post_sensitive(
    admin_client: Client, application: Application, view: str
) -> None:
    if view == "changeform_view":
        url = reverse("admin:destinations_destination_add") + "?kind=servicebus"
    else:
        url = ROTATE_URL

    response = admin_client.post(
        url, {"servicebus_connection_string": CONNECTION_STRING}
    )

    sensitive = response.wsgi_request.sensitive_post_parameters  # type: ignore[attr-defined]
    for name in SECRET_FIELDS:
        assert sensitive == "__ALL__" or name in sensitive


# Key rotation from the admin.


def test_changelist_shows_rotate_button_to_superuser(admin_client: Client) -> None:
    response = admin_client.get(CHANGELIST_URL)

    assert ROTATE_URL in response.text


def test_changelist_hides_rotate_button_from_staff(
    client: Client, staff_member: User
) -> None:
    client.force_login(staff_member)

    response = client.get(CHANGELIST_URL)

    assert response.status_code == 200
    assert ROTATE_URL not in response.text


@pytest.mark.parametrize("method", ["get", "post"])
def test_rotation_forbidden_to_staff(
    client: Client, staff_member: User, servicebus: Destination, method: str
) -> None:
    client.force_login(staff_member)
    token = Destination.objects.values_list(
        "servicebus_connection_string", flat=True
    ).get(pk=servicebus.pk)

    response = getattr(client, method)(ROTATE_URL)

    assert response.status_code == 403
    servicebus.refresh_from_db()
    assert servicebus.servicebus_connection_string == token


def test_rotation_page_previews_counts(
    settings: Settings, admin_client: Client, application: Application
) -> None:
    settings.ENCRYPTION_KEYS = [KEY_A]
    make_servicebus(application, "Old")
    settings.ENCRYPTION_KEYS = [KEY_B, KEY_A]
    make_servicebus(application, "Current")

    response = admin_client.get(ROTATE_URL)

    assert response.status_code == 200
    [column] = [
        counts
        for counts in response.context["counts"]
        if counts.label == "destinations.Destination.servicebus_connection_string"
    ]
    assert column.rotated == 1
    assert column.current == 1
    assert "Rotate 1 secret now" in response.text


def test_rotation_reencrypts_and_reports_counts(
    settings: Settings,
    admin_client: Client,
    application: Application,
    sqs: Destination,
) -> None:
    settings.ENCRYPTION_KEYS = [KEY_A]
    old = make_servicebus(application, "Old")
    settings.ENCRYPTION_KEYS = [KEY_B, KEY_A]
    make_servicebus(application, "Current")

    response = admin_client.post(ROTATE_URL, follow=True)

    assert response.redirect_chain[-1][0] == CHANGELIST_URL
    assert messages_of(response) == [
        "Re-encrypted secrets with the first key in ENCRYPTION_KEYS: 1 rotated, "
        "1 already current, 1 empty, 0 failed."
    ]
    token = Destination.objects.values_list(
        "servicebus_connection_string", flat=True
    ).get(pk=old.pk)
    assert Fernet(KEY_B.encode()).decrypt(token.encode()).decode() == (
        CONNECTION_STRING
    )


def test_rotation_lists_undecryptable_ids(
    settings: Settings, admin_client: Client, application: Application
) -> None:
    settings.ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    lost = make_servicebus(application, "Lost key")
    lost_token = Destination.objects.values_list(
        "servicebus_connection_string", flat=True
    ).get(pk=lost.pk)
    settings.ENCRYPTION_KEYS = [KEY_B, KEY_A]

    response = admin_client.post(ROTATE_URL, follow=True)

    shown = messages_of(response)
    assert shown[0].endswith("0 rotated, 0 already current, 0 empty, 1 failed.")
    assert re.search(rf"IDs {lost.pk}\b", shown[1])
    assert "destinations.Destination.servicebus_connection_string" in shown[1]
    assert lost_token not in response.text
    lost.refresh_from_db()
    assert lost.servicebus_connection_string == lost_token


def test_rotation_without_keys_changes_nothing(
    settings: Settings, admin_client: Client, servicebus: Destination
) -> None:
    token = servicebus.servicebus_connection_string
    settings.ENCRYPTION_KEYS = []

    response = admin_client.post(ROTATE_URL, follow=True)

    assert any("destinations.E001" in text for text in messages_of(response))
    servicebus.refresh_from_db()
    assert servicebus.servicebus_connection_string == token


def test_rotation_is_recorded_in_history(
    settings: Settings,
    admin_client: Client,
    application: Application,
    admin_user: User,
) -> None:
    settings.ENCRYPTION_KEYS = [KEY_A]
    old = make_servicebus(application, "Old")
    settings.ENCRYPTION_KEYS = [KEY_B, KEY_A]

    admin_client.post(ROTATE_URL)

    entry = LogEntry.objects.get(object_id=str(old.pk))
    assert entry.user == admin_user
    history = admin_client.get(
        reverse("admin:destinations_destination_history", args=[old.pk])
    )
    assert "connection string: re-encrypted with the current key" in history.text
    assert "Rotate secrets" in history.text


def test_masked_value_rejects_reverse_relation(sqs: Destination) -> None:
    from django.core.exceptions import FieldDoesNotExist

    with pytest.raises(FieldDoesNotExist) as raised:
        masked_value(sqs, "deliveries")

    assert "Destination.deliveries is a reverse relation" in str(raised.value)


def test_migration_clears_pasted_key(
    key_as_key_name: Destination, application: Application
) -> None:
    named = make_servicebus(application, name="Named")
    clear_pasted_keys = import_module(
        "destinations.migrations.0005_clear_pasted_keys"
    ).clear_pasted_keys

    clear_pasted_keys(django_apps, None)

    key_as_key_name.refresh_from_db()
    named.refresh_from_db()
    assert key_as_key_name.servicebus_key_name == ""
    assert named.servicebus_key_name == "platform-send"


# Secrets pasted into plain fields of the add forms.

ADD_URL = reverse("admin:destinations_destination_add")
APPLICATION_ADD_URL = reverse("admin:destinations_application_add")
QUEUE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders"
AWS_SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END"
SERVICE_ACCOUNT_KEY = (
    '{"type":"service_account","private_key":"' + PEM_KEY.replace("\n", "\\n") + '"}'
)
PASTED_SECRETS = [
    pytest.param(CONNECTION_STRING, id="connection-string"),
    pytest.param(SERVICE_ACCOUNT_KEY, id="service-account"),
    pytest.param(PEM_KEY, id="pem"),
    pytest.param(AWS_SECRET_KEY, id="aws-secret-key"),
    pytest.param(SHARED_ACCESS_KEY, id="shared-access-key"),
]
SQS_FORM = {"sqs_queue_url": QUEUE_URL, "sqs_encryption": "none"}
PUBSUB_FORM = {"pubsub_project_id": "shop-prod", "pubsub_topic_id": "events"}
SERVICEBUS_FORM = {
    "servicebus_connection_string": CONNECTION_STRING,
    "servicebus_entity_type": "queue",
    "servicebus_entity_name": "orders",
}
PASTE_TARGETS = [
    pytest.param(Kind.SQS, SQS_FORM, "sqs_queue_url", id="queue-url"),
    pytest.param(Kind.SQS, SQS_FORM, "sqs_region", id="region"),
    pytest.param(
        Kind.SQS,
        {**SQS_FORM, "sqs_encryption": "sse-kms"},
        "sqs_kms_key_arn",
        id="kms-key-arn",
    ),
    pytest.param(Kind.SQS, SQS_FORM, "name", id="name"),
    pytest.param(Kind.PUBSUB, PUBSUB_FORM, "pubsub_project_id", id="project-id"),
    pytest.param(Kind.PUBSUB, PUBSUB_FORM, "pubsub_topic_id", id="topic-id"),
    pytest.param(Kind.PUBSUB, PUBSUB_FORM, "pubsub_endpoint", id="endpoint"),
    pytest.param(
        Kind.SERVICEBUS, SERVICEBUS_FORM, "servicebus_entity_name", id="entity-name"
    ),
]


def assert_not_echoed(text: str, secret: str) -> None:
    for line in secret.splitlines():
        assert line[-30:] not in text
        assert line[-30:].lower() not in text.lower()
    assert SHARED_ACCESS_KEY.rstrip("=") not in text


@pytest.mark.parametrize(("kind", "values", "field"), PASTE_TARGETS)
@pytest.mark.parametrize("secret", PASTED_SECRETS)
def test_pasted_secret_neither_quoted_nor_refilled(
    admin_client: Client,
    application: Application,
    kind: str,
    values: dict[str, str],
    field: str,
    secret: str,
) -> None:
    form = {
        "application": str(application.pk),
        "stage": Stage.TEST,
        "kind": kind,
        "name": "Pasted",
        **values,
        field: secret,
    }

    response = admin_client.post(f"{ADD_URL}?kind={kind}", form)

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "is not shown" in " ".join(errors[field])
    assert_not_echoed(response.text, secret)
    assert not Destination.objects.filter(kind=kind).exists()


def test_pasted_secret_in_hidden_kind_not_quoted(
    admin_client: Client, application: Application
) -> None:
    form = {"application": str(application.pk), "stage": Stage.TEST}
    form |= {"name": "Pasted", "kind": CONNECTION_STRING}

    response = admin_client.post(f"{ADD_URL}?kind=sqs", form)

    assert response.status_code == 200
    assert_not_echoed(response.text, CONNECTION_STRING)


@pytest.mark.parametrize("field", ["name", "contact_emails"])
@pytest.mark.parametrize("secret", PASTED_SECRETS)
def test_application_secret_neither_quoted_nor_refilled(
    admin_client: Client, field: str, secret: str
) -> None:
    form = {"name": "Shop", "slug": "shop", "contact_emails": "", field: secret}

    response = admin_client.post(APPLICATION_ADD_URL, form)

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "is not shown" in " ".join(errors[field])
    assert_not_echoed(response.text, secret)
    assert not Application.objects.exists()


def test_ordinary_wrong_value_still_refilled(
    admin_client: Client, application: Application
) -> None:
    form = {"application": str(application.pk), "stage": Stage.TEST, "kind": "sqs"}
    form |= {"name": "Q", "sqs_queue_url": "https://example.com/q"}
    form |= {"sqs_encryption": "none"}

    response = admin_client.post(f"{ADD_URL}?kind=sqs", form)

    assert response.status_code == 200
    assert (
        "'https://example.com/q' is not an SQS queue URL"
        in response.context["adminform"].form.errors["sqs_queue_url"][0]
    )
    assert 'value="https://example.com/q"' in response.text
