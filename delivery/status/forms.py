"""Forms of the status pages: event search, replay and notification choices."""

from datetime import UTC, datetime
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from portal.form_errors import ExplainedErrors

from ..models import Event, NotificationPreference


class TimeInput(forms.DateTimeInput):
    """The browser's date and time picker. Its value has no time zone, so the pages
    read it as UTC, like every time they show."""

    input_type = "datetime-local"

    def __init__(self, attrs: dict[str, Any] | None = None) -> None:
        super().__init__(attrs, format="%Y-%m-%dT%H:%M")


class UtcDateTimeField(forms.DateTimeField):
    """A date and time, converted to UTC, between the years 1 and 9999 in UTC.

    Python's datetime supports no other years. A value with a UTC offset, such as
    0001-01-01T00:00+01:00, can leave that range once converted. Comparing it with
    a stored time then raises OverflowError, and PostgreSQL stores it as a time
    that psycopg can no longer read.
    """

    def to_python(self, value: Any) -> datetime | None:
        try:
            parsed = super().to_python(value)
        except ValidationError as error:
            if error.code != "invalid":
                raise
            raise ValidationError(
                f"{self.label}: {value!r} is not a date and time. Enter one such as "
                "2025-03-03 08:00, in UTC.",
                code="invalid",
            ) from error
        if parsed is None:
            return None
        try:
            return parsed.astimezone(UTC)
        except OverflowError as error:
            raise ValidationError(
                f"{self.label}: {value!r} is outside 0001-01-01 00:00 to 9999-12-31 "
                "23:59 UTC once converted to UTC. Enter a time in that range, in UTC "
                "and without an offset.",
                code="out_of_range",
            ) from error


def time_field(label: str, help_text: str, required: bool) -> UtcDateTimeField:
    return UtcDateTimeField(
        label=label, help_text=help_text, required=required, widget=TimeInput()
    )


def minutes(value: datetime) -> str:
    """Format `value` as 2025-03-03 08:00. On glibc, strftime's %Y drops the
    leading zeros of years before 1000, but isoformat() keeps them."""
    return value.replace(tzinfo=None).isoformat(sep=" ", timespec="minutes")


def check_range(form: forms.Form, start: datetime | None, end: datetime | None) -> None:
    if start and end and start >= end:
        form.add_error(
            "end",
            f"The end ({minutes(end)}) is not after the start ({minutes(start)}). "
            "Choose an end after the start.",
        )


class PlainLabels:
    """Labels without Django's trailing colon, which reads oddly before a
    checkbox and adds nothing to a label above its input."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("label_suffix", "")
        super().__init__(*args, **kwargs)


class EventSearchForm(PlainLabels, ExplainedErrors, forms.Form):
    event_id = forms.CharField(
        label="Event ID", required=False, max_length=64, help_text="The exact id."
    )
    object_key = forms.CharField(
        label="Object key",
        required=False,
        max_length=512,
        help_text=(
            "The changed object's key, as an event's page shows it, such as "
            "4102/st-80233/order/FKO-2025-000119-A."
        ),
    )
    type = forms.CharField(
        label="Event type",
        required=False,
        max_length=100,
        help_text="The exact type, such as ACCEPT or PRODUCT_UPSERT.",
    )
    start = time_field("From (UTC)", "Events at or after this time.", required=False)
    end = time_field("Until (UTC)", "Events before this time.", required=False)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        check_range(self, cleaned.get("start"), cleaned.get("end"))
        return cleaned

    def filter(self, events: QuerySet[Event]) -> QuerySet[Event]:
        """Filter `events` by the filled-in fields. Call it after is_valid()."""
        data = self.cleaned_data
        exact = {
            "pk": data.get("event_id", "").strip(),
            "object_key": data.get("object_key", "").strip(),
            "type": data.get("type", "").strip(),
        }
        events = events.filter(
            **{name: value for name, value in exact.items() if value}
        )
        if data.get("start"):
            events = events.filter(time__gte=data["start"])
        if data.get("end"):
            events = events.filter(time__lt=data["end"])
        return events


class ReplayForm(PlainLabels, ExplainedErrors, forms.Form):
    start = time_field(
        "From (UTC)", "Events at or after this time, such as 2025-03-03 08:00.", True
    )
    end = time_field("Until (UTC)", "Events before this time.", True)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        check_range(self, cleaned.get("start"), cleaned.get("end"))
        return cleaned


class NotificationForm(PlainLabels, ExplainedErrors, forms.ModelForm):
    class Meta:
        model = NotificationPreference
        fields = ["on_failing", "on_paused", "on_disabled", "on_recovered"]
