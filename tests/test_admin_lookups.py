"""Change list query strings, object ids and action selections that the database
rejects, on every admin of the site.

Some lookups only fail when the query runs, and some only on PostgreSQL: run this
file with DATABASE_URL set to a PostgreSQL database too (see the README).
"""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth.models import User
from django.db import DataError, OperationalError, connection, models
from django.test import Client, RequestFactory
from django.urls import reverse

from delivery.models import BulkJob, BulkJobKind
from portal.changelists import SafeChangeList, rejects_value

from .delivery_doubles import make_application, make_destination, queue_events

pytestmark = pytest.mark.django_db

REJECTED_MESSAGE = "The database rejected this list&#x27;s filters"


def first_field(
    model: type[models.Model], kind: type[models.Field[Any, Any]], lookup: str
) -> str:
    """Return the name of `model`'s first column of `kind` that its admin lets
    staff filter with `lookup`, or "" when it has none."""
    model_admin = admin.site._registry[model]
    request = RequestFactory().get("/admin/")
    for field in model._meta.concrete_fields:
        if not isinstance(field, kind):
            continue
        # The admin rejects some lookups itself, such as those on the password.
        if model_admin.lookup_allowed(f"{field.name}__{lookup}", "", request):
            return field.name
    return ""


def changelist_url(model: type[models.Model]) -> str:
    opts = model._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")


def rejected_lookups() -> list[Any]:
    """Return (model, query string) for each registered model: an invalid regular
    expression on a text column and a year out of range on a time column."""
    cases = []
    for model in admin.site._registry:
        label = model._meta.label
        text = first_field(model, models.CharField, "regex")
        if text:
            cases.append(pytest.param(model, f"{text}__regex=[", id=f"{label}-regex"))
        time = first_field(model, models.DateTimeField, "year")
        if time:
            query = f"{time}__year=99999999"
            cases.append(pytest.param(model, query, id=f"{label}-year"))
    return cases


@pytest.fixture
def rows(admin_user: User) -> None:
    """Create a row of each model the admin lists. PostgreSQL checks a regular
    expression only when it compares it with a row."""
    destination = make_destination(make_application())
    queue_events(destination, [("01jndg9q00szajyh54fp5wvwjv", "4102/st-1/a", 0)])
    BulkJob.objects.create(
        kind=BulkJobKind.TEST_EVENT,
        created_by=admin_user,
        destination_ids=[destination.pk],
        total=1,
    )


def test_every_admin_uses_safe_changelist() -> None:
    request = RequestFactory().get("/admin/")

    for model, model_admin in admin.site._registry.items():
        changelist = model_admin.get_changelist(request)
        assert issubclass(changelist, SafeChangeList), model._meta.label


@pytest.mark.parametrize(("model", "query"), rejected_lookups())
def test_rejected_lookup_redirects_with_message(
    admin_client: Client, rows: None, model: type[models.Model], query: str
) -> None:
    url = changelist_url(model)

    response = admin_client.get(f"{url}?{query}")

    assert response.status_code == 302
    assert response["Location"] == f"{url}?e=1"
    page = admin_client.get(response["Location"])
    assert page.status_code == 200
    assert REJECTED_MESSAGE in page.text
    assert query.replace("[", "") in page.text


def test_nul_in_filter_answers(admin_client: Client, rows: None) -> None:
    url = reverse("admin:destinations_application_changelist")

    response = admin_client.get(f"{url}?name=%00")

    # PostgreSQL rejects NUL in text; SQLite compares it like any character.
    if connection.vendor == "postgresql":
        assert response.status_code == 302
        assert response["Location"] == f"{url}?e=1"
    else:
        assert response.status_code == 200


def test_nul_in_search_answers(admin_client: Client, rows: None) -> None:
    url = reverse("admin:destinations_application_changelist")

    response = admin_client.get(f"{url}?q=%00")

    # Django's search form rejects the NUL and the list shows every row.
    assert response.status_code == 200
    assert "Null characters are not allowed." in response.text


def test_rejected_lookup_with_error_flag_answers(
    admin_client: Client, rows: None
) -> None:
    url = reverse("admin:destinations_application_changelist")

    response = admin_client.get(f"{url}?e=1&name__regex=[")

    # Django's own page for a lookup that fails again after the redirect.
    assert response.status_code == 200


def test_rejects_value_keeps_database_outages() -> None:
    database = connection.alias

    assert rejects_value(database, DataError("invalid regular expression"))
    assert rejects_value(database, ValueError("year 99999999 is out of range"))
    assert not rejects_value(database, OperationalError("connection refused"))
    assert not rejects_value(database, KeyError("name"))


@pytest.mark.parametrize("page", ["change", "history", "delete"])
def test_object_id_with_nul_not_found(
    admin_client: Client, rows: None, page: str
) -> None:
    url = reverse("admin:delivery_event_changelist") + f"01jndg9q00%00/{page}/"

    response = admin_client.get(url)

    # Django redirects to the admin index for an object that does not exist.
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:index")


@pytest.mark.parametrize(
    ("changelist", "action", "selected"),
    [
        ("admin:destinations_destination_changelist", "send_test_events", "abc"),
        ("admin:destinations_destination_changelist", "export_csv", ""),
        ("admin:delivery_delivery_changelist", "retry_selected", "\x00"),
        (
            "admin:delivery_delivery_changelist",
            "retry_selected",
            "99999999999999999999",
        ),
        ("admin:delivery_event_changelist", "delete_selected", "e1\x00"),
    ],
)
def test_action_on_invalid_id_rejected(
    admin_client: Client, rows: None, changelist: str, action: str, selected: str
) -> None:
    url = reverse(changelist)
    data = {"action": action, "_selected_action": [selected], "index": "0"}

    response = admin_client.post(url, data)

    assert response.status_code == 302
    assert response["Location"] == url
    page = admin_client.get(url)
    assert "invalid ids" in page.text
    assert "no action ran" in page.text
