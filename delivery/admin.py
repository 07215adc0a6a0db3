"""The staff admin for events and deliveries: read-only, with a retry action."""

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Exists, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import reverse

from portal.changelists import SafeChangeListMixin

from . import bulk
from .claiming import earlier_unfinished
from .jsontext import readable_json
from .models import Attempt, BulkJob, Delivery, DeliveryStatus, Event
from .pagination import LargeTableAdminMixin
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


class RecentTypeFilter(admin.SimpleListFilter):
    """The event types of the latest events. Listing every type ever seen would
    read the whole table; event ids are ULIDs, so the latest are an index range."""

    title = "type"
    parameter_name = "type"
    sample = 10_000

    def lookups(self, request: HttpRequest, model_admin: Any) -> Any:
        latest = Event.objects.order_by("-id").values_list("type", flat=True)
        types = sorted(set(latest[: self.sample]))
        return [(name, name) for name in types]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> Any:
        if self.value():
            return queryset.filter(type=self.value())
        return queryset


@admin.register(Event)
class EventAdmin(
    LargeTableAdminMixin, ReadOnlyMixin, SafeChangeListMixin, admin.ModelAdmin
):
    list_display = ("id", "type", "object_key", "time", "application", "stage")
    # No date hierarchy: its year and month links read every event's time.
    list_filter = (
        "stage",
        "is_test",
        RecentTypeFilter,
        ("time", admin.DateFieldListFilter),
    )
    list_select_related = ("application",)
    search_fields = ("=id", "=object_key")
    search_help_text = "An event ID or an object key, exactly."
    readonly_fields = (
        "id",
        "application",
        "stage",
        "type",
        "object_key",
        "time",
        "is_test",
        "recorded_at",
        "event_data",
    )
    # Shown by event_data instead, which escapes what a page cannot encode.
    exclude = ("data",)
    inlines = (DeliveryInline,)

    @admin.display(description="data")
    def event_data(self, event: Event) -> str:
        return readable_json(event.data)


@admin.register(Delivery)
class DeliveryAdmin(
    LargeTableAdminMixin, ReadOnlyMixin, SafeChangeListMixin, admin.ModelAdmin
):
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
    search_fields = ("=event__id", "=event__object_key")
    search_help_text = (
        "An event ID or an object key (the ordering key of ordered destinations), "
        "exactly."
    )
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

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Delivery], search_term: str
    ) -> tuple[QuerySet[Delivery], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        # The events first, through their primary key and object key indexes:
        # an OR across the join to events would read every delivery.
        events = Event.objects.filter(Q(id=term) | Q(object_key=term))
        return queryset.filter(event__in=events.values("id")), False

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


def bulk_rows(job: BulkJob) -> list[bulk.Row]:
    return [bulk.describe(job, item) for item in bulk.results(job)]


@admin.register(BulkJob)
class BulkJobAdmin(ReadOnlyMixin, SafeChangeListMixin, admin.ModelAdmin):
    """Bulk actions on destinations; a job's page shows its progress."""

    list_display = ("__str__", "created_by", "created_at", "done", "finished_at")
    list_select_related = ("created_by",)
    fields = ()

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The user who started a job may follow it without rights on jobs in general.
        if obj is not None and obj.created_by_id == request.user.pk:
            return True
        return super().has_view_permission(request, obj)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        job = self.get_object(request, object_id)
        if job is None:
            self.message_user(
                request,
                f"No bulk action with ID {object_id!r} exists; it may have been "
                "deleted.",
                messages.WARNING,
            )
            return redirect(reverse("admin:delivery_bulkjob_changelist"))
        if not self.has_view_permission(request, job):
            raise PermissionDenied

        progress = bulk.progress(job)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": str(job),
            "job": job,
            "progress": progress,
            "rows": [] if progress.running else bulk_rows(job),
        }
        template = "admin/delivery/bulkjob/progress.html"
        return TemplateResponse(request, template, context)
