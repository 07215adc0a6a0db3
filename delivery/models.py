"""Events, their deliveries to destinations, and every attempt to send one."""

import json
from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from typing import Any, cast

from django.conf import settings
from django.db import models
from django.utils import timezone

from destinations.models import Application, Destination, Stage


def format_time(value: datetime) -> str:
    """Format a datetime as the platform does: UTC, milliseconds, a trailing Z."""
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


class Event(models.Model):
    """One change event of an application and stage, in the platform's envelope."""

    id = models.CharField(primary_key=True, max_length=64)
    # Unindexed alone: the index on (application, stage, time) leads with it.
    application = models.ForeignKey(
        Application, on_delete=models.CASCADE, related_name="events", db_index=False
    )
    stage = models.CharField(max_length=4, choices=Stage.choices)
    type = models.CharField(max_length=100)
    object_key = models.CharField(
        max_length=512, help_text="The changed object's id: the ordering key."
    )
    time = models.DateTimeField()
    data = models.JSONField()
    # The envelope exactly as published. PostgreSQL's jsonb reorders keys, so `data`
    # alone cannot give back the bytes the platform sent.
    envelope_json = models.TextField(blank=True)
    is_test = models.BooleanField(default=False)
    recorded_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            models.Index(fields=["application", "stage", "time"]),
            # The admin's search by object key.
            models.Index(fields=["object_key"], name="event_object_key"),
        ]

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
        """Return the envelope as UTF-8 JSON: the bytes a partner receives, which are
        the published bytes when the event came with them."""
        if self.envelope_json:
            return self.envelope_json.encode()
        text = json.dumps(self.envelope(), separators=(",", ":"), ensure_ascii=False)
        return text.encode()


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    SENDING = "sending", "Sending"
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed"
    # Kept while the destination is paused or disabled by the engine; released to
    # pending, in order, when it is enabled again.
    HELD = "held", "Held"


# Statuses that keep a later delivery of the same ordering key waiting.
UNFINISHED = (DeliveryStatus.PENDING, DeliveryStatus.SENDING, DeliveryStatus.HELD)


class Delivery(models.Model):
    """One event on its way to one destination."""

    # Both keys are unindexed alone, because an index leads with each: the unique
    # constraint with the event, and (destination, status). Every index costs a
    # write at each status change, twice per delivery.
    event = models.ForeignKey(
        Event, on_delete=models.CASCADE, related_name="deliveries", db_index=False
    )
    destination = models.ForeignKey(
        Destination,
        on_delete=models.CASCADE,
        related_name="deliveries",
        db_index=False,
    )
    status = models.CharField(
        max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    # Empty for destinations that do not keep order; otherwise the event's object key.
    ordering_key = models.CharField(max_length=512, blank=True)
    # The event's time, copied so the ordering check needs no join: deliveries of one
    # key go out in (event_time, event id) order, whatever order they were created in.
    event_time = models.DateTimeField(default=timezone.now)
    is_test = models.BooleanField(default=False)
    attempt_count = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    # When the retry window started: creation, or the latest manual retry or replay.
    scheduled_at = models.DateTimeField(default=timezone.now)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    claimed_by = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "deliveries"
        constraints = [
            models.UniqueConstraint(
                fields=["event", "destination"], name="one_delivery_per_destination"
            )
        ]
        indexes = [
            models.Index(fields=["destination", "status"]),
            # The admin's latest test event per destination.
            models.Index(
                fields=["destination", "-created_at"],
                condition=models.Q(is_test=True),
                name="delivery_test_by_destination",
            ),
            # The claim query: due pending deliveries, oldest first.
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(status="pending"),
                name="delivery_due",
            ),
            # The ordering check: earlier unfinished deliveries of the same key.
            models.Index(
                fields=["destination", "ordering_key", "event_time", "event"],
                condition=models.Q(status__in=["pending", "sending", "held"]),
                name="delivery_unfinished_by_key",
            ),
            models.Index(
                fields=["lease_expires_at"],
                condition=models.Q(status="sending"),
                name="delivery_leased",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event_id} to destination {self.destination_id}"


class Outcome(models.TextChoices):
    SUCCESS = "success", "Delivered"
    TRANSIENT_ERROR = "transient_error", "Transient error"
    PERMANENT_ERROR = "permanent_error", "Permanent error"


class AttemptQuerySet(models.QuerySet["Attempt"]):
    # Same parameters as QuerySet.bulk_create, whose stub types them by a type
    # variable that a subclass cannot name.
    def bulk_create(  # type: ignore[override]
        self,
        objs: Iterable["Attempt"],
        batch_size: int | None = None,
        ignore_conflicts: bool = False,
        update_conflicts: bool = False,
        update_fields: Collection[str] | None = None,
        unique_fields: Collection[str] | None = None,
    ) -> list["Attempt"]:
        attempts = list(objs)
        for attempt in attempts:
            attempt.copy_from_delivery()
        super().bulk_create(
            cast(Any, attempts),
            batch_size,
            ignore_conflicts,
            update_conflicts,
            update_fields,
            unique_fields,
        )
        return attempts


class Attempt(models.Model):
    """One try at sending a delivery, kept whatever its outcome."""

    # Unindexed alone: the index on (delivery, -started_at) leads with it.
    delivery = models.ForeignKey(
        Delivery, on_delete=models.CASCADE, related_name="attempts", db_index=False
    )
    # Copies of the delivery's columns, so a destination's recent attempts are one
    # index range away instead of a join through its deliveries. The delivery's own
    # foreign key already ties the attempt to this destination, so the database
    # checks no second constraint at each insert.
    destination = models.ForeignKey(
        Destination,
        on_delete=models.CASCADE,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    is_test = models.BooleanField(default=False)
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

    objects = AttemptQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at"]
        indexes = [
            models.Index(fields=["delivery", "-started_at"]),
            # The admin's destination list: the latest attempt and the last 24 hours.
            models.Index(
                fields=["destination", "is_test", "-started_at"],
                name="attempt_by_destination",
            ),
            models.Index(
                fields=["destination", "is_test", "-started_at"],
                condition=~models.Q(outcome="success"),
                name="attempt_failed_by_destination",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.get_outcome_display()} at {self.started_at:%Y-%m-%d %H:%M:%S}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.copy_from_delivery()
        super().save(*args, **kwargs)

    def copy_from_delivery(self) -> None:
        """Fill the columns copied from the delivery, unless they are set."""
        if self.destination_id is None:
            self.destination_id = self.delivery.destination_id
            self.is_test = self.delivery.is_test


class BulkJobKind(models.TextChoices):
    TEST_EVENT = "test_event", "Send test event"
    RETRY_FAILED = "retry_failed", "Retry failed deliveries"


class BulkJob(models.Model):
    """A staff action on many destinations. A worker does it in chunks, so the
    request that started it returns at once. The job's page shows its progress
    and, per destination, its result."""

    kind = models.CharField(max_length=16, choices=BulkJobKind.choices)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # Worked through in this order; `done` is how far the worker got.
    destination_ids = models.JSONField(default=list)
    total = models.PositiveIntegerField()
    done = models.PositiveIntegerField(default=0)
    succeeded = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "bulk action"

    def __str__(self) -> str:
        noun = "destination" if self.total == 1 else "destinations"
        return f"{self.get_kind_display()} on {self.total} {noun}"


class BulkJobItem(models.Model):
    """The outcome of a bulk job for one destination."""

    job = models.ForeignKey(BulkJob, on_delete=models.CASCADE, related_name="items")
    # Null when the destination was deleted after it was selected.
    destination = models.ForeignKey(
        Destination, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    destination_name = models.CharField(max_length=200)
    # The test event's delivery, whose status is the result of a test send.
    delivery = models.ForeignKey(
        Delivery, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    # Retrying: how many failed deliveries were queued again.
    count = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)

    class Meta:
        indexes = [models.Index(fields=["job", "destination_name"])]

    def __str__(self) -> str:
        return f"{self.job} / {self.destination_name}"


class NotificationPreference(models.Model):
    """An app developer's choice of destination changes to be mailed about, per
    application. The application's contact addresses are mailed regardless."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="notification_preferences",
    )
    application = models.ForeignKey(
        Application, on_delete=models.CASCADE, related_name="notification_preferences"
    )
    on_failing = models.BooleanField(
        "a destination starts failing",
        default=False,
        help_text="The first failed attempt after a successful one.",
    )
    on_paused = models.BooleanField(
        "a destination is paused",
        default=False,
        help_text="The destination rejected an event, so sending stopped.",
    )
    on_disabled = models.BooleanField(
        "a destination is disabled",
        default=False,
        help_text="Every attempt failed for too long, so sending stopped.",
    )
    on_recovered = models.BooleanField(
        "a destination recovers",
        default=False,
        help_text="The first success after failures, or sending enabled again.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["user", "application"], name="one_preference_per_application"
            )
        ]

    def __str__(self) -> str:
        return f"{self.user} about {self.application}"


class Replay(models.Model):
    """A request to send a time range of events to one destination again, kept so
    that its progress has a page and the request has a record."""

    destination = models.ForeignKey(
        Destination, on_delete=models.CASCADE, related_name="replays"
    )
    start = models.DateTimeField(help_text="Events at or after this time.")
    end = models.DateTimeField(help_text="Events before this time.")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    requested_at = models.DateTimeField(auto_now_add=True)
    event_count = models.PositiveIntegerField(
        help_text="Events of the range when the replay was requested."
    )

    def __str__(self) -> str:
        return f"Replay {self.pk} to destination {self.destination_id}"
