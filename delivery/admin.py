"""The staff admin for events and deliveries: read-only, with a retry action."""

from typing import Any

from django.contrib import admin, messages
from django.db.models import Exists, Q, QuerySet
from django.http import HttpRequest

from .engine import earlier_unfinished
from .models import Attempt, Delivery, DeliveryStatus, Event
from .replay import retry_failed


class ReadOnlyMixin:
    """Events, deliveries and attempts are records: staff act on them through
    actions, never by editing."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class AttemptInline(ReadOnlyMixin, admin.TabularInline):
    model = Attempt
    extra = 0
    can_delete = False
    fields = (
        "started_at",
        "duration_ms",
        "outcome",
        "error_kind",
        "message",
        "remote_message_id",
    )
    readonly_fields = fields


class DeliveryInline(ReadOnlyMixin, admin.TabularInline):
    model = Delivery
    extra = 0
    can_delete = False
    fields = ("destination", "status", "attempt_count", "next_attempt_at")
    readonly_fields = fields
    show_change_link = True


@admin.register(Event)
class EventAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("id", "type", "object_key", "time", "application", "stage")
    list_filter = ("stage", "is_test", "type")
    list_select_related = ("application",)
    search_fields = ("=id", "=object_key", "type")
    date_hierarchy = "time"
    readonly_fields = (
        "id",
        "application",
        "stage",
        "type",
        "object_key",
        "time",
        "is_test",
        "recorded_at",
        "data",
    )
    inlines = (DeliveryInline,)
    # The search box is an exact match on indexed columns, so a count of matches is
    # cheap, but the unfiltered total over millions of rows is not.
    show_full_result_count = False


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = (
        "event",
        "event_type",
        "destination",
        "shown_status",
        "attempt_count",
        "next_attempt_at",
        "updated_at",
    )
    list_filter = ("status", "destination__stage", "destination__kind", "is_test")
    list_select_related = ("event", "destination", "destination__application")
    search_fields = ("=event__id", "=ordering_key", "=event__object_key")
    readonly_fields = (
        "event",
        "destination",
        "status",
        "ordering_key",
        "event_time",
        "attempt_count",
        "next_attempt_at",
        "scheduled_at",
        "lease_expires_at",
        "claimed_by",
        "created_at",
        "updated_at",
    )
    inlines = (AttemptInline,)
    actions = ("retry_selected",)
    show_full_result_count = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Delivery]:
        waiting = Q(status=DeliveryStatus.PENDING) & ~Q(ordering_key="")
        return (
            super()
            .get_queryset(request)
            .annotate(waiting=waiting & Exists(earlier_unfinished()))
        )

    @admin.display(description="type")
    def event_type(self, delivery: Delivery) -> str:
        return delivery.event.type

    @admin.display(description="status", ordering="status")
    def shown_status(self, delivery: Any) -> str:
        if getattr(delivery, "waiting", False):
            return "Waiting for an earlier event of the same object"
        return str(delivery.get_status_display())

    def has_retry_permission(self, request: HttpRequest) -> bool:
        # Rows are read-only, but retrying changes them: it needs the change right.
        return request.user.has_perm("delivery.change_delivery")

    @admin.action(description="Retry selected failed deliveries", permissions=["retry"])
    def retry_selected(
        self, request: HttpRequest, queryset: QuerySet[Delivery]
    ) -> None:
        selected = queryset.count()
        count = retry_failed(queryset)
        self.message_user(
            request,
            f"Queued {count} of {selected} selected deliveries again; only failed "
            "ones are retried.",
            messages.SUCCESS,
        )
