"""The Partner staff admin: applications and their destinations."""

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import flatten_fieldsets
from django.core.exceptions import PermissionDenied
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.http import (
    HttpRequest,
    HttpResponse,
    StreamingHttpResponse,
)
from django.shortcuts import redirect
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.decorators import method_decorator
from django.utils.html import format_html
from django.utils.text import Truncator
from django.views.decorators.debug import sensitive_post_parameters

from delivery import bulk, health
from delivery.models import Attempt, BulkJobKind, Delivery, DeliveryStatus, Outcome
from delivery.replay import events_in_range, replay
from delivery.status.forms import UtcDateTimeField, check_range
from delivery.summaries import (
    attach,
    last_status,
    success_rate,
    with_delivery_figures,
)
from delivery.testevents import send_test_event
from portal.changelists import SafeChangeListMixin
from portal.form_errors import ExplainedErrors

from .admin_checks import CheckAccessMixin
from .admin_secrets import SecretsAdminMixin
from .audit import AuditMixin
from .export import csv_response
from .forms import (
    COMMON_FIELDS,
    KIND_FIELDS,
    RETRY_FIELDS,
    SECRET_FIELDS,
    ApplicationForm,
    DestinationForm,
)
from .grants import grant_for
from .models import Application, Destination, Kind, State


@admin.register(Application)
class ApplicationAdmin(SafeChangeListMixin, admin.ModelAdmin):
    form = ApplicationForm
    list_display = ("name", "slug", "destination_count", "contact_emails")
    search_fields = ("name", "slug")
    prepopulated_fields = {"slug": ("name",)}
    filter_horizontal = ("developers",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Application]:
        return super().get_queryset(request).annotate(Count("destinations"))

    @admin.display(description="destinations", ordering="destinations__count")
    def destination_count(self, application: Any) -> int:
        return int(application.destinations__count)


def _latest_test(model: type[Delivery] | type[Attempt]) -> QuerySet[Any]:
    # Both tables index test rows by destination: see their Meta.indexes.
    return model.objects.filter(destination=OuterRef("pk"), is_test=True)


def _last_test(destinations: QuerySet[Destination]) -> QuerySet[Destination]:
    deliveries = _latest_test(Delivery).order_by("-created_at")
    attempts = _latest_test(Attempt).order_by("-started_at")
    return destinations.annotate(
        last_test_status=Subquery(deliveries.values("status")[:1]),
        last_test_outcome=Subquery(attempts.values("outcome")[:1]),
        last_test_error=Subquery(attempts.values("error_kind")[:1]),
        last_test_at=Subquery(attempts.values("started_at")[:1]),
    )


# Error kinds that mean the partner has not granted the stage's identity enough.
ACCESS_ERRORS = frozenset(
    {"access_denied", "kms_access_denied", "unauthorized", "unauthenticated"}
)


def counted(count: int, singular: str, plural: str = "") -> str:
    """Return "1 event" or "3 events"."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


SEND_TEST_HELP = "Sends a test event now; its result appears here once the worker ran."


STATE_FIELDS = (
    "state",
    "pause_reason",
    "disabled_reason",
    "last_error",
    "consecutive_failures",
    "failing_since",
    "last_success_at",
)


class StateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> Any:
        return State.choices

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> Any:
        value = self.value()
        if value in State.values:
            return queryset.filter(State.filter(value))
        return queryset


class ReplayForm(ExplainedErrors, forms.Form):
    prefix = "replay"
    start = UtcDateTimeField(
        label="From (UTC)",
        help_text="Events at or after this time, e.g. 2025-03-03 08:00.",
    )
    end = UtcDateTimeField(label="Until (UTC)", help_text="Events before this time.")

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        check_range(self, cleaned.get("start"), cleaned.get("end"))
        return cleaned


@admin.register(Destination)
class DestinationAdmin(
    SecretsAdminMixin,
    AuditMixin,
    CheckAccessMixin,
    SafeChangeListMixin,
    admin.ModelAdmin,
):
    form = DestinationForm
    list_display = (
        "name",
        "application",
        "stage",
        "kind",
        "target",
        "state",
        "last_delivery",
        "success_rate_24h",
        "last_error_summary",
        "last_test_result",
    )
    list_filter = ("stage", "kind", StateFilter)
    list_select_related = ("application",)
    search_fields = (
        "name",
        "application__name",
        "application__slug",
        "sqs_queue_url",
        "pubsub_project_id",
        "pubsub_topic_id",
        "servicebus_namespace",
        "servicebus_entity_name",
    )
    actions = (
        "enable_destinations",
        "disable_destinations",
        "send_test_events",
        "retry_failed_deliveries",
        "replay_events",
        "export_csv",
    )
    change_form_template = "admin/destinations/destination/change_form.html"

    # Listing and change pages.

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        # The page's figures come from one query over the page's ids. As
        # annotations of the list's own query, PostgreSQL would compute them for
        # every row that OFFSET skips too.
        changelist = super().get_changelist_instance(request)
        changelist.result_list = attach(
            list(changelist.result_list), _last_test(with_delivery_figures())
        )
        return changelist

    @admin.display(description="last test")
    def last_test_result(self, destination: Any) -> str:
        status = getattr(destination, "last_test_status", None)
        if status is None:
            return "-"
        if status in (DeliveryStatus.PENDING, DeliveryStatus.SENDING):
            return "Queued"
        outcome = destination.last_test_outcome
        when = f"{destination.last_test_at:%Y-%m-%d %H:%M}"
        if outcome == Outcome.SUCCESS:
            return f"Delivered {when}"
        return f"Failed {when}: {destination.last_test_error}"

    @admin.display(description="last delivery")
    def last_delivery(self, destination: Any) -> str:
        return last_status(destination)

    @admin.display(description="delivered, 24 h")
    def success_rate_24h(self, destination: Any) -> str:
        return success_rate(destination)

    @admin.display(description="last error")
    def last_error_summary(self, destination: Any) -> str:
        if not destination.last_error:
            return "-"
        text = Truncator(destination.last_error).chars(80)
        when = getattr(destination, "last_error_at", None)
        if when is None:
            return text
        return format_html(
            '<span title="{}">{}</span> <span class="error-time">({})</span>',
            destination.last_error,
            text,
            f"{when:%Y-%m-%d %H:%M}",
        )

    @admin.display(description="latest test event")
    def latest_test(self, destination: Destination) -> str:
        delivery = (
            Delivery.objects.filter(destination=destination, event__is_test=True)
            .order_by("-created_at")
            .first()
        )
        if delivery is None:
            return "No test event sent yet."
        if delivery.status in (DeliveryStatus.PENDING, DeliveryStatus.SENDING):
            return format_html(
                '<span class="test-result" data-status="queued">Queued at {} UTC, '
                "waiting for the worker. Reload the page to see the result.</span>",
                f"{delivery.created_at:%Y-%m-%d %H:%M:%S}",
            )

        attempt = delivery.attempts.order_by("-started_at").first()
        if attempt is None:
            return "No attempt recorded."
        when = f"{attempt.started_at:%Y-%m-%d %H:%M:%S}"
        if attempt.outcome == Outcome.SUCCESS:
            return format_html(
                '<span class="test-result" data-status="success">Delivered at {} UTC '
                "in {} ms, message ID {}.</span>",
                when,
                attempt.duration_ms,
                attempt.remote_message_id,
            )
        result = format_html(
            '<span class="test-result" data-status="error">{} at {} UTC ({}): {}'
            "</span>",
            attempt.get_outcome_display(),
            when,
            attempt.error_kind,
            attempt.message,
        )
        if attempt.error_kind in ACCESS_ERRORS:
            result += format_html(
                ' <a href="#what-to-grant">What the {} identity needs</a>',
                destination.stage,
            )
        return result

    @admin.display(description="instructions")
    def grant_guidance(self, destination: Destination) -> str:
        return render_to_string(
            "destinations/grant.html", {"grant": grant_for(destination)}
        )

    @admin.display(description="connection string")
    def servicebus_summary(self, destination: Destination) -> str:
        return destination.servicebus_summary or "-"

    # One form per kind.

    def _kind(self, request: HttpRequest, destination: Destination | None) -> str:
        if destination is not None:
            return destination.kind
        return request.POST.get("kind") or request.GET.get("kind", "")

    def get_fieldsets(
        self, request: HttpRequest, obj: Destination | None = None
    ) -> Any:
        kind = self._kind(request, obj)
        kind_fields = list(KIND_FIELDS.get(kind, ()))
        if obj is not None and kind == Kind.SERVICEBUS:
            kind_fields.insert(0, "servicebus_summary")

        fieldsets: list[tuple[str | None, dict[str, Any]]] = [
            (None, {"fields": COMMON_FIELDS}),
            (Kind(kind).label if kind in Kind.values else "", {"fields": kind_fields}),
        ]
        fieldsets.append(
            ("Retries", {"fields": RETRY_FIELDS, "classes": ("collapse",)})
        )
        if obj is not None:
            fieldsets.append(("What to grant", {"fields": ("grant_guidance",)}))
            fieldsets.append(("Delivery state", {"fields": STATE_FIELDS}))
            fieldsets.append(
                (
                    "Test event",
                    {"fields": ("latest_test",), "description": SEND_TEST_HELP},
                )
            )
        return fieldsets

    def get_form(
        self,
        request: HttpRequest,
        obj: Destination | None = None,
        change: bool = False,
        **kwargs: Any,
    ) -> Any:
        # The secret fields are declared on the form. Django rejects their model
        # fields, which are not editable, when named here, so only the fieldsets
        # list them.
        if "fields" not in kwargs:
            kwargs["fields"] = flatten_fieldsets(self.get_fieldsets(request, obj))
        if kwargs["fields"] is not None:
            kwargs["fields"] = [
                name for name in kwargs["fields"] if name not in SECRET_FIELDS
            ]
        return super().get_form(request, obj, change, **kwargs)

    def get_readonly_fields(
        self, request: HttpRequest, obj: Destination | None = None
    ) -> tuple[str, ...]:
        if obj is None:
            return ()
        return (
            "kind",
            "servicebus_summary",
            "grant_guidance",
            "latest_test",
            *STATE_FIELDS,
        )

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        initial = super().get_changeform_initial_data(request)
        if initial.get("kind") not in Kind.values:
            initial.pop("kind", None)
        return initial

    def add_view(
        self,
        request: HttpRequest,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        if self._kind(request, None) not in Kind.values:
            return self.choose_kind_view(request)
        return super().add_view(request, form_url, extra_context)

    @method_decorator(sensitive_post_parameters(*SECRET_FIELDS))
    def changeform_view(self, *args: Any, **kwargs: Any) -> Any:
        return super().changeform_view(*args, **kwargs)

    def choose_kind_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_add_permission(request):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Add destination: choose its kind",
            "kinds": Kind.choices,
            "query": request.GET.copy(),
        }
        return TemplateResponse(
            request, "admin/destinations/destination/choose_kind.html", context
        )

    # Sending test events.

    def get_urls(self) -> list[URLPattern]:
        send_test = path(
            "<path:object_id>/send-test/",
            self.admin_site.admin_view(self.send_test_view),
            name="destinations_destination_send_test",
        )
        return [send_test, *super().get_urls()]

    def send_test_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        destination = self.destination_for_post(request, object_id)
        if isinstance(destination, HttpResponse):
            return destination

        send_test_event(destination, requested_by=request.user)
        self.message_user(
            request,
            f"Test event queued for {destination.name}. Reload this page to see the "
            "result.",
            messages.SUCCESS,
        )
        return redirect(
            reverse("admin:destinations_destination_change", args=[destination.pk])
        )

    # Bulk actions.

    @admin.action(description="Enable selected destinations", permissions=["change"])
    def enable_destinations(
        self, request: HttpRequest, queryset: QuerySet[Destination]
    ) -> None:
        self._set_enabled(request, queryset, enabled=True)

    @admin.action(description="Disable selected destinations", permissions=["change"])
    def disable_destinations(
        self, request: HttpRequest, queryset: QuerySet[Destination]
    ) -> None:
        self._set_enabled(request, queryset, enabled=False)

    def _set_enabled(
        self, request: HttpRequest, queryset: QuerySet[Destination], enabled: bool
    ) -> None:
        selected = queryset.count()
        changed = released = 0
        verb = "Enabled" if enabled else "Disabled"
        action = f"{'Enable' if enabled else 'Disable'} selected destinations"
        for destination in queryset:
            with self.recording_changes(request, destination, action):
                if enabled and destination.state != State.ACTIVE:
                    released += health.enable(destination)
                    changed += 1
                elif not enabled and destination.enabled:
                    health.disable(destination)
                    changed += 1
        message = (
            f"{verb} {changed} of {selected} selected destinations; "
            f"{selected - changed} already were."
        )
        if released:
            message += (
                f" Released {counted(released, 'held delivery', 'held deliveries')}, "
                "to be sent in order."
            )
        self.message_user(request, message, messages.SUCCESS)

    @admin.action(description="Send test event", permissions=["change"])
    def send_test_events(
        self, request: HttpRequest, queryset: QuerySet[Destination]
    ) -> HttpResponse:
        return self._start_bulk_job(request, queryset, BulkJobKind.TEST_EVENT)

    @admin.action(description="Retry failed deliveries", permissions=["change"])
    def retry_failed_deliveries(
        self, request: HttpRequest, queryset: QuerySet[Destination]
    ) -> HttpResponse:
        return self._start_bulk_job(request, queryset, BulkJobKind.RETRY_FAILED)

    def _start_bulk_job(
        self, request: HttpRequest, queryset: QuerySet[Destination], kind: BulkJobKind
    ) -> HttpResponse:
        # Only the ids are read here, whatever the number of destinations: the
        # worker does the rest, and the job's page shows how far it got.
        ids = list(queryset.order_by("pk").values_list("pk", flat=True))
        job = bulk.start(kind, ids, request.user)
        self.message_user(
            request,
            f"{kind.label}: {counted(len(ids), 'destination')} queued. This page "
            "shows the progress and then each destination's result.",
            messages.SUCCESS,
        )
        return redirect(reverse("admin:delivery_bulkjob_change", args=[job.pk]))

    @admin.action(description="Export selected as CSV", permissions=["view"])
    def export_csv(
        self, request: HttpRequest, queryset: QuerySet[Destination]
    ) -> StreamingHttpResponse:
        return csv_response(queryset)

    @admin.action(description="Replay events of a time range", permissions=["change"])
    def replay_events(
        self, request: HttpRequest, queryset: QuerySet[Destination]
    ) -> HttpResponse | None:
        destinations = list(queryset.select_related("application"))
        form = ReplayForm(request.POST if "replay-start" in request.POST else None)
        if form.is_valid():
            start, end = form.cleaned_data["start"], form.cleaned_data["end"]
            if "confirm" in request.POST:
                total = sum(replay(d, start, end) for d in destinations)
                self.message_user(
                    request,
                    f"Replaying {counted(total, 'event')} to "
                    f"{counted(len(destinations), 'destination')}.",
                    messages.SUCCESS,
                )
                return None
            counts = [(d, events_in_range(d, start, end).count()) for d in destinations]
        else:
            counts = []

        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Replay events",
            "form": form,
            "counts": counts,
            "total": sum(count for _, count in counts),
            "destinations": destinations,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(
            request, "admin/destinations/destination/replay.html", context
        )
