"""The app developers' delivery status pages.

An app developer sees only the applications that list them among their developers;
every other application, and its destinations, events and deliveries, is "not
found" to them (404), so the pages do not reveal what exists. Staff see every
application only with the permission to view destinations, and send test events,
retry or replay only with the permission to change them (403 otherwise).
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, wraps
from typing import TYPE_CHECKING, Any, cast

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from destinations.grants import grant_for
from destinations.models import Application, Destination, Stage, State

from ..jsontext import readable_json
from ..models import (
    Delivery,
    DeliveryStatus,
    Event,
    NotificationPreference,
    Replay,
    format_time,
)
from ..replay import events_in_range, replay, retry_failed
from ..testevents import send_test_event
from . import queries
from .forms import EventSearchForm, NotificationForm, ReplayForm

if TYPE_CHECKING:
    from django.contrib.auth.models import AnonymousUser, User

logger = logging.getLogger(__name__)

EVENTS_PER_PAGE = 50
# Seconds between reloads of a replay's progress page while deliveries are left.
PROGRESS_REFRESH_SECONDS = 5


@dataclass(frozen=True)
class Scope:
    """One application and stage: what every page below the overview shows."""

    application: Application
    stage: str
    user: "User | AnonymousUser"

    @cached_property
    def can_act(self) -> bool:
        """Whether the user may send test events, retry and replay here. Asked
        only by the pages that offer those, to spare the others a query."""
        return queries.may_act(self.user, self.application)

    def destinations(self) -> QuerySet[Destination]:
        return Destination.objects.filter(
            application=self.application, stage=self.stage
        )

    def events(self) -> QuerySet[Event]:
        return Event.objects.filter(application=self.application, stage=self.stage)

    def url(self, name: str, *args: object) -> str:
        return reverse(
            f"status:{name}", args=[self.application.slug, self.stage, *args]
        )

    def context(self) -> dict[str, Any]:
        return {"scope": self, "application": self.application, "stage": self.stage}


ScopedView = Callable[..., HttpResponse]


def scoped(view: ScopedView) -> Callable[..., HttpResponse]:
    """Resolve the URL's application and stage for the signed-in user, or 404."""

    @login_required
    @wraps(view)
    def wrapper(
        request: HttpRequest, application: str, stage: str, **kwargs: Any
    ) -> HttpResponse:
        found = get_object_or_404(
            queries.visible_applications(request.user), slug=application
        )
        return view(request, Scope(found, stage, request.user), **kwargs)

    return wrapper


def acting(view: ScopedView) -> Callable[..., HttpResponse]:
    """Like scoped, for a view that sends events: 403 for a user who may only look.

    The application itself stays hidden (404) from those who may not see it.
    """

    @wraps(view)
    def checked(
        request: HttpRequest, scope: Scope, *args: Any, **kwargs: Any
    ) -> HttpResponse:
        if not scope.can_act:
            raise PermissionDenied(
                "Sending test events, retrying and replaying need the permission "
                "to change destinations."
            )
        return view(request, scope, *args, **kwargs)

    return scoped(checked)


def signed_in_user(request: HttpRequest) -> "User":
    """Return the user of a request that passed login_required."""
    return cast("User", request.user)


def render_scoped(
    request: HttpRequest, template: str, scope: Scope, **context: Any
) -> HttpResponse:
    return render(request, f"status/{template}", {**scope.context(), **context})


# Applications and their destinations.


@login_required
def home(request: HttpRequest) -> HttpResponse:
    applications = list(queries.visible_applications(request.user))
    counts = (
        Destination.objects.filter(application__in=applications)
        .values("application", "stage")
        .annotate(count=Count("pk"))
        .order_by()
    )
    count_of = {(row["application"], row["stage"]): row["count"] for row in counts}
    rows = [
        (
            application,
            [(stage, count_of.get((application.pk, stage), 0)) for stage in Stage],
        )
        for application in applications
    ]
    return render(request, "status/home.html", {"rows": rows})


@scoped
def overview(request: HttpRequest, scope: Scope) -> HttpResponse:
    summaries = queries.overview(scope.application, scope.stage, timezone.now())
    return render_scoped(request, "overview.html", scope, summaries=summaries)


@scoped
def destination_detail(
    request: HttpRequest, scope: Scope, destination: int
) -> HttpResponse:
    found = get_object_or_404(scope.destinations(), pk=destination)
    now = timezone.now()
    hours = queries.hourly_attempts(found, now)
    return render_scoped(
        request,
        "destination.html",
        scope,
        destination=found,
        report=queries.health_of(found),
        hours=[entry for entry in hours if entry.delivered or entry.failed],
        chart=queries.chart_data(hours),
        delivered_total=sum(entry.delivered for entry in hours),
        failed_total=sum(entry.failed for entry in hours),
        latency=queries.latency(found, now),
        sample_size=queries.LATENCY_SAMPLE_SIZE,
        failures=queries.recent_failures(found),
        grant=grant_for(found),
        test_result=queries.latest_test(found),
    )


@require_POST
@acting
def send_test(request: HttpRequest, scope: Scope, destination: int) -> HttpResponse:
    found = get_object_or_404(scope.destinations(), pk=destination)
    delivery = send_test_event(found, requested_by=request.user)
    logger.info(
        "User %s sent test event %s to destination %s",
        request.user.pk,
        delivery.event_id,
        found.pk,
    )
    messages.success(
        request,
        f"Test event queued for {found.name}. Reload this page to see its result.",
    )
    return redirect(scope.url("destination", found.pk) + "#test-event")


# Events.


@scoped
def event_search(request: HttpRequest, scope: Scope) -> HttpResponse:
    form = EventSearchForm(request.GET or None)
    events = scope.events()
    if form.is_bound:
        events = form.filter(events) if form.is_valid() else events.none()
    events = events.order_by("-time", "-pk")
    page = Paginator(events, EVENTS_PER_PAGE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render_scoped(
        request,
        "events.html",
        scope,
        form=form,
        page=page,
        query=query.urlencode(),
    )


@scoped
def event_detail(request: HttpRequest, scope: Scope, event_id: str) -> HttpResponse:
    # No event id contains a NUL, and PostgreSQL raises DataError on one in text.
    if "\x00" in event_id:
        raise Http404(f"No event has the id {event_id!r}.")
    event = get_object_or_404(scope.events(), pk=event_id)
    # The published text keeps the platform's key order, which PostgreSQL's jsonb
    # column does not.
    envelope = json.loads(event.envelope_json) if event.envelope_json else None
    return render_scoped(
        request,
        "event.html",
        scope,
        event=event,
        event_time=format_time(event.time),
        payload=readable_json(envelope or event.envelope(), indent=2),
        deliveries=queries.event_deliveries(event),
    )


@require_POST
@acting
def retry_delivery(request: HttpRequest, scope: Scope, delivery: int) -> HttpResponse:
    found = get_object_or_404(
        Delivery.objects.select_related("destination"),
        pk=delivery,
        destination__application=scope.application,
        destination__stage=scope.stage,
    )
    if found.status != DeliveryStatus.FAILED:
        messages.warning(
            request,
            f"The delivery to {found.destination.name} is "
            f"{found.get_status_display().lower()}, not failed, so it was not "
            "retried. Only failed deliveries can be retried.",
        )
    else:
        retry_failed(Delivery.objects.filter(pk=found.pk))
        logger.info("User %s retried delivery %s", request.user.pk, found.pk)
        messages.success(
            request,
            f"The delivery to {found.destination.name} is queued again. Reload this "
            "page to see the new attempt.",
        )
    return redirect(scope.url("event", found.event_id))


# Replays.


@acting
def replay_request(
    request: HttpRequest, scope: Scope, destination: int
) -> HttpResponse:
    """Ask for a time range, state how many events it holds, and replay it only
    once the app developer confirms that number."""
    found = get_object_or_404(scope.destinations(), pk=destination)
    form = ReplayForm(request.POST if request.method == "POST" else None)
    if not form.is_valid():
        return render_scoped(
            request, "replay.html", scope, destination=found, form=form
        )

    start, end = form.cleaned_data["start"], form.cleaned_data["end"]
    if "confirm" not in request.POST:
        count = events_in_range(found, start, end).count()
        return render_scoped(
            request,
            "replay.html",
            scope,
            destination=found,
            form=form,
            count=count,
            confirming=True,
        )

    total = replay(found, start, end)
    record = Replay.objects.create(
        destination=found,
        start=start,
        end=end,
        requested_by=signed_in_user(request),
        event_count=total,
    )
    logger.info(
        "User %s replayed %d events of [%s, %s) to destination %s (replay %s)",
        request.user.pk,
        total,
        start.isoformat(),
        end.isoformat(),
        found.pk,
        record.pk,
    )
    return redirect(scope.url("replay-progress", record.pk))


@scoped
def replay_progress(request: HttpRequest, scope: Scope, replay_id: int) -> HttpResponse:
    record = get_object_or_404(
        Replay.objects.select_related("destination", "requested_by"),
        pk=replay_id,
        destination__application=scope.application,
        destination__stage=scope.stage,
    )
    progress = queries.replay_progress(record)
    # Pending deliveries to a destination that staff switched off wait for it to
    # be enabled, so reloading would show nothing new.
    sending = record.destination.state == State.ACTIVE
    refresh = sending and not progress.finished and request.GET.get("refresh") != "off"
    return render_scoped(
        request,
        "replay_progress.html",
        scope,
        replay=record,
        destination=record.destination,
        progress=progress,
        sending=sending,
        refresh_seconds=PROGRESS_REFRESH_SECONDS if refresh else None,
    )


# Notifications.


@login_required
def notification_settings(request: HttpRequest, application: str) -> HttpResponse:
    found = get_object_or_404(
        queries.visible_applications(request.user), slug=application
    )
    user = signed_in_user(request)
    preference = NotificationPreference.objects.filter(
        user=user, application=found
    ).first() or NotificationPreference(user=user, application=found)
    form = NotificationForm(
        request.POST if request.method == "POST" else None, instance=preference
    )
    if form.is_valid():
        form.save()
        messages.success(request, f"Saved your notification choices for {found.name}.")
        return redirect("status:notifications", found.slug)
    context = {
        "application": found,
        "form": form,
        "email": user.email,
        # Staff may open any application's page, but only its developers are mailed.
        "member": found.developers.filter(pk=user.pk).exists(),
    }
    return render(request, "status/notifications.html", context)
