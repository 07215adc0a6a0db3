"""Form errors that name the field, the value and the fix (portal/form_errors.py)."""

from typing import Any

import pytest
from django import forms

from delivery.status.forms import EventSearchForm
from destinations.forms import DestinationForm
from destinations.models import Application, Destination, Kind, Stage
from portal.form_errors import ExplainedErrors

pytestmark = pytest.mark.django_db

QUEUE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders"


@pytest.fixture
def application() -> Application:
    return Application.objects.create(name="Orders", slug="orders")


def destination_errors(owner: Application, **values: Any) -> dict[str, Any]:
    data = {
        "application": owner.pk,
        "stage": Stage.TEST,
        "kind": Kind.SQS,
        "name": "Orders",
        "enabled": "on",
        "sqs_queue_url": QUEUE_URL,
        **values,
    }
    form = DestinationForm(data=data)
    assert not form.is_valid()
    return dict(form.errors)


def test_long_name_gets_length_and_fix(application: Application) -> None:
    limit = Destination._meta.get_field("name").max_length

    errors = destination_errors(application, name="n" * 300)

    assert errors["name"] == [
        f"Name is 300 characters long, over the limit of {limit}. Shorten it to "
        f"{limit} characters or fewer."
    ]


def test_missing_name_is_required(application: Application) -> None:
    errors = destination_errors(application, name="")

    assert errors["name"] == ["Name is required. Enter a value."]


def test_unknown_stage_lists_choices(application: Application) -> None:
    errors = destination_errors(application, stage="QA")

    assert errors["stage"] == ["Stage: QA is not a choice. Choose one of: TEST, PROD."]


def test_deleted_application_named(application: Application) -> None:
    errors = destination_errors(application, application="999999")

    assert errors["application"] == [
        "Application: no choice 999999 exists, or it was deleted meanwhile. Choose "
        "one from the list."
    ]


def test_retry_delay_must_be_number(application: Application) -> None:
    label = DestinationForm().fields["retry_initial_delay"].label

    not_number = destination_errors(application, retry_initial_delay="soon")
    negative = destination_errors(application, retry_initial_delay="-5")

    assert not_number["retry_initial_delay"] == [
        f"{label} must be a whole number, such as 30."
    ]
    assert negative["retry_initial_delay"] == [
        f"{label} must be 0 or more. Enter a larger number."
    ]


def test_status_search_names_long_event_id() -> None:
    form = EventSearchForm(data={"event_id": "e" * 65})

    assert not form.is_valid()
    assert form.errors["event_id"] == [
        "Event ID is 65 characters long, over the limit of 64. Shorten it to 64 "
        "characters or fewer."
    ]


class ChosenMessageForm(ExplainedErrors, forms.Form):
    note = forms.CharField(error_messages={"required": "Write a note first."})


def test_chosen_message_kept() -> None:
    form = ChosenMessageForm(data={})

    assert not form.is_valid()
    assert form.errors["note"] == ["Write a note first."]
