"""Events, their deliveries to destinations, and every attempt to send one."""

import json
from datetime import UTC, datetime
from typing import Any

from django.db import models

from destinations.models import Application, Destination, Stage


def format_time(value: datetime) -> str:
    """Format a datetime as the platform does: UTC, milliseconds, a trailing Z."""
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


class Event(models.Model):
    """One change event of an application and stage, in the platform's envelope."""

    id = models.CharField(primary_key=True, max_length=64)
    application = models.ForeignKey(
        Application, on_delete=models.CASCADE, related_name="events"
    )
    stage = models.CharField(max_length=4, choices=Stage.choices)
    type = models.CharField(max_length=100)
    object_key = models.CharField(
        max_length=512, help_text="The changed object's id: the ordering key."
    )
    time = models.DateTimeField()
    data = models.JSONField()
    is_test = models.BooleanField(default=False)
    recorded_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["application", "stage", "time"])]

    def __str__(self) -> str:
        return f"{self.type} {self.id}"

    def envelope(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": format_time(self.time),
            "type": self.type,
            "data": self.data,
        }

    def body(self) -> bytes:
        """The envelope as compact UTF-8 JSON: the exact bytes a partner receives."""
        text = json.dumps(self.envelope(), separators=(",", ":"), ensure_ascii=False)
        return text.encode()


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    SENDING = "sending", "Sending"
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed"


class Delivery(models.Model):
    """One event on its way to one destination."""

    event = models.ForeignKey(
        Event, on_delete=models.CASCADE, related_name="deliveries"
    )
    destination = models.ForeignKey(
        Destination, on_delete=models.CASCADE, related_name="deliveries"
    )
    status = models.CharField(
        max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    attempt_count = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "deliveries"
        constraints = [
            models.UniqueConstraint(
                fields=["event", "destination"], name="one_delivery_per_destination"
            )
        ]
        indexes = [models.Index(fields=["destination", "status"])]

    def __str__(self) -> str:
        return f"{self.event_id} to destination {self.destination_id}"


class Outcome(models.TextChoices):
    SUCCESS = "success", "Delivered"
    TRANSIENT_ERROR = "transient_error", "Transient error"
    PERMANENT_ERROR = "permanent_error", "Permanent error"


class Attempt(models.Model):
    """One try at sending a delivery, kept whatever its outcome."""

    delivery = models.ForeignKey(
        Delivery, on_delete=models.CASCADE, related_name="attempts"
    )
    started_at = models.DateTimeField()
    duration_ms = models.PositiveIntegerField()
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    error_kind = models.CharField(
        max_length=64, blank=True, help_text="A stable code, such as queue_not_found."
    )
    message = models.TextField(
        blank=True, help_text="What went wrong and what the partner can do about it."
    )
    remote_message_id = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["delivery", "-started_at"])]

    def __str__(self) -> str:
        return f"{self.get_outcome_display()} at {self.started_at:%Y-%m-%d %H:%M:%S}"
