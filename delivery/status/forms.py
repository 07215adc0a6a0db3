"""Forms of the status pages: event search, replay and notification choices."""

from datetime import datetime
from typing import Any

from django import forms
from django.db.models import QuerySet

from ..models import Event, NotificationPreference


class TimeInput(forms.DateTimeInput):
    """The browser's date and time picker. Its value has no time zone, so the pages
    read it as UTC, like every time they show."""

    input_type = "datetime-local"

    def __init__(self, attrs: dict[str, Any] | None = None) -> None:
        super().__init__(attrs, format="%Y-%m-%dT%H:%M")


def time_field(label: str, help_text: str, required: bool) -> forms.DateTimeField:
    return forms.DateTimeField(
        label=label, help_text=help_text, required=required, widget=TimeInput()
    )


def check_range(form: forms.Form, start: datetime | None, end: datetime | None) -> None:
    if start and end and start >= end:
        form.add_error(
            "end",
            f"The end ({end:%Y-%m-%d %H:%M}) is not after the start "
            f"({start:%Y-%m-%d %H:%M}). Choose an end after the start.",
        )


class PlainLabels:
    """Labels without Django's trailing colon, which reads oddly before a
    checkbox and adds nothing to a label above its input."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("label_suffix", "")
        super().__init__(*args, **kwargs)


class EventSearchForm(PlainLabels, forms.Form):
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


class ReplayForm(PlainLabels, forms.Form):
    start = time_field(
        "From (UTC)", "Events at or after this time, such as 2025-03-03 08:00.", True
    )
    end = time_field("Until (UTC)", "Events before this time.", True)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        check_range(self, cleaned.get("start"), cleaned.get("end"))
        return cleaned


class NotificationForm(PlainLabels, forms.ModelForm):
    class Meta:
        model = NotificationPreference
        fields = ["on_failing", "on_paused", "on_disabled", "on_recovered"]
