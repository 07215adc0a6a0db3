"""The queries behind the status pages. Each figure of a page comes from one
aggregate query over all of the page's rows, never from a query per row."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from django.contrib.auth.models import (
    AbstractBaseUser,
    AnonymousUser,
    PermissionsMixin,
)
from django.db import connection
from django.db.models import (
    Aggregate,
    Count,
    Exists,
    FloatField,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
)
from django.db.models.functions import TruncHour

from destinations.models import Application, Destination, State

from ..claiming import earlier_unfinished
from ..models import Attempt, Delivery, DeliveryStatus, Event, Outcome, Replay
from ..replay import events_in_range

DAY = timedelta(hours=24)
WEEK = timedelta(days=7)
CHART_HOURS = 7 * 24
PERCENTILES = (0.5, 0.9, 0.99)
# Without percentile_cont (SQLite), percentiles are computed in Python from at most
# this many of the latest successful attempts, so a busy destination's page stays
# cheap. Above it, the figures describe the latest attempts only.
LATENCY_SAMPLE_SIZE = 10_000
RECENT_FAILURES = 10

User = AbstractBaseUser | AnonymousUser


VIEW_PERMISSION = "destinations.view_destination"
ACT_PERMISSION = "destinations.change_destination"


def staff_may(user: User, permission: str) -> bool:
    """Return whether `user` is staff with `permission` (superusers have them all).

    Being staff alone grants nothing here, as in the admin: a staff account made
    for one task must not see or act on every application's deliveries.
    """
    if not getattr(user, "is_staff", False):
        return False
    return isinstance(user, PermissionsMixin) and user.has_perm(permission)


def visible_applications(user: User) -> QuerySet[Application]:
    """Return the applications `user` may see: staff allowed to view destinations
    see all, anyone else only those that list them among their developers."""
    if staff_may(user, VIEW_PERMISSION):
        return Application.objects.all()
    if not user.is_authenticated:
        return Application.objects.none()
    return Application.objects.filter(developers=user.pk)


def may_act(user: User, application: Application) -> bool:
    """Return whether `user` may send test events, retry and replay for
    `application`: its own developers, and staff allowed to change destinations."""
    if staff_may(user, ACT_PERMISSION):
        return True
    return user.is_authenticated and application.developers.filter(pk=user.pk).exists()


# Health, as the overview shows it.


class Health(StrEnum):
    HEALTHY = "healthy"
    FAILING = "failing"
    PAUSED = "paused"
    DISABLED = "disabled"


@dataclass(frozen=True)
class HealthReport:
    health: Health
    # Why the destination is not healthy, in the words the partner can act on.
    reason: str = ""


def health_of(destination: Destination) -> HealthReport:
    """Return the destination's health: paused or disabled as the engine (or staff)
    left it; failing while active with failed attempts since its last success."""
    state = destination.state
    if state == State.DISABLED:
        return HealthReport(Health.DISABLED, destination.disabled_reason)
    if state == State.OFF:
        return HealthReport(Health.DISABLED, "Disabled by Partner staff.")
    if state == State.PAUSED:
        return HealthReport(Health.PAUSED, destination.pause_reason)
    if destination.consecutive_failures > 0:
        return HealthReport(Health.FAILING, destination.last_error)
    return HealthReport(Health.HEALTHY)


@dataclass(frozen=True)
class DestinationSummary:
    destination: Destination
    report: HealthReport
    # Attempts of the last 24 hours, test events left out.
    attempts: int
    successes: int
    pending: int
    held: int

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.attempts if self.attempts else None

    @property
    def success_percent(self) -> str:
        rate = self.success_rate
        return "" if rate is None else f"{rate * 100:.1f} %"


def overview(
    application: Application, stage: str, now: datetime
) -> list[DestinationSummary]:
    """Return a DestinationSummary per destination of the application and stage,
    in three queries whatever the number of destinations."""
    destinations = list(
        Destination.objects.filter(application=application, stage=stage).order_by(
            "name", "pk"
        )
    )
    ids = [destination.pk for destination in destinations]
    if not ids:
        return []

    success = Q(outcome=Outcome.SUCCESS)
    rates = (
        Attempt.objects.filter(
            destination__in=ids,
            is_test=False,
            started_at__gte=now - DAY,
        )
        .values("destination")
        .annotate(total=Count("pk"), successes=Count("pk", filter=success))
        .order_by()
    )
    rate_of = {row["destination"]: (row["total"], row["successes"]) for row in rates}

    backlog = (
        Delivery.objects.filter(
            destination__in=ids,
            status__in=(DeliveryStatus.PENDING, DeliveryStatus.HELD),
        )
        .values("destination")
        .annotate(
            pending=Count("pk", filter=Q(status=DeliveryStatus.PENDING)),
            held=Count("pk", filter=Q(status=DeliveryStatus.HELD)),
        )
        .order_by()
    )
    backlog_of = {row["destination"]: (row["pending"], row["held"]) for row in backlog}

    summaries = []
    for destination in destinations:
        attempts, successes = rate_of.get(destination.pk, (0, 0))
        pending, held = backlog_of.get(destination.pk, (0, 0))
        summaries.append(
            DestinationSummary(
                destination=destination,
                report=health_of(destination),
                attempts=attempts,
                successes=successes,
                pending=pending,
                held=held,
            )
        )
    return summaries


# The destination page.


@dataclass(frozen=True)
class HourCount:
    hour: datetime
    delivered: int
    failed: int


def hourly_attempts(destination: Destination, now: datetime) -> list[HourCount]:
    """Return delivered and failed attempts per hour for the last 7 days, oldest
    first, one entry per hour including the empty ones. Test events are left out.
    """
    current_hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    first_hour = current_hour - timedelta(hours=CHART_HOURS - 1)
    rows = (
        Attempt.objects.filter(
            destination=destination,
            is_test=False,
            started_at__gte=first_hour,
        )
        .annotate(hour=TruncHour("started_at", tzinfo=UTC))
        .values("hour")
        .annotate(
            delivered=Count("pk", filter=Q(outcome=Outcome.SUCCESS)),
            failed=Count("pk", filter=~Q(outcome=Outcome.SUCCESS)),
        )
        .order_by("hour")
    )
    by_hour = {
        row["hour"].astimezone(UTC): (row["delivered"], row["failed"]) for row in rows
    }

    hours = []
    for index in range(CHART_HOURS):
        hour = first_hour + timedelta(hours=index)
        delivered, failed = by_hour.get(hour, (0, 0))
        hours.append(HourCount(hour, delivered, failed))
    return hours


def chart_data(hours: Sequence[HourCount]) -> dict[str, list[int]]:
    """Return the hours as the columns the chart script reads: Unix seconds,
    delivered and failed counts."""
    return {
        "hours": [int(entry.hour.timestamp()) for entry in hours],
        "delivered": [entry.delivered for entry in hours],
        "failed": [entry.failed for entry in hours],
    }


class PercentileCont(Aggregate):
    """PostgreSQL's percentile_cont: the value at `fraction` of the ordered values,
    interpolated between the two nearest ones."""

    function = "percentile_cont"
    name = "PercentileCont"
    output_field = FloatField()
    template = (
        "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)%(filter)s"
    )

    def __init__(self, expression: str, fraction: float, **extra: Any) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction {fraction} is not between 0 and 1.")
        # A float from this module, never user input, so it is safe in the SQL text.
        super().__init__(expression, fraction=repr(float(fraction)), **extra)


@dataclass(frozen=True)
class Latency:
    """Percentiles of successful attempts' duration_ms over one time window."""

    window: str
    count: int
    # Fraction -> milliseconds; empty when the window has no successful attempt.
    percentiles: dict[float, float]
    # Whether only the latest LATENCY_SAMPLE_SIZE attempts were used.
    sampled: bool = False

    def value(self, fraction: float) -> str:
        value = self.percentiles.get(fraction)
        return "" if value is None else f"{value:,.0f} ms"

    @property
    def p50(self) -> str:
        return self.value(0.5)

    @property
    def p90(self) -> str:
        return self.value(0.9)

    @property
    def p99(self) -> str:
        return self.value(0.99)


def latency(destination: Destination, now: datetime) -> list[Latency]:
    """Return the latency of the last 24 hours and of the last 7 days."""
    attempts = Attempt.objects.filter(
        destination=destination,
        is_test=False,
        outcome=Outcome.SUCCESS,
        started_at__gte=now - WEEK,
    )
    if connection.vendor == "postgresql":
        return _latency_in_database(attempts, now)
    return _latency_in_python(attempts, now)


def _latency_in_database(attempts: QuerySet[Attempt], now: datetime) -> list[Latency]:
    recent = Q(started_at__gte=now - DAY)
    aggregates: dict[str, Any] = {
        "day_count": Count("pk", filter=recent),
        "week_count": Count("pk"),
    }
    for fraction in PERCENTILES:
        key = _key(fraction)
        aggregates[f"day_{key}"] = PercentileCont(
            "duration_ms", fraction, filter=recent
        )
        aggregates[f"week_{key}"] = PercentileCont("duration_ms", fraction)
    row = attempts.order_by().aggregate(**aggregates)

    def window(prefix: str, label: str) -> Latency:
        values = {
            fraction: row[f"{prefix}_{_key(fraction)}"]
            for fraction in PERCENTILES
            if row[f"{prefix}_{_key(fraction)}"] is not None
        }
        return Latency(label, row[f"{prefix}_count"], values)

    return [window("day", "Last 24 hours"), window("week", "Last 7 days")]


def _latency_in_python(attempts: QuerySet[Attempt], now: datetime) -> list[Latency]:
    sample = list(
        attempts.order_by("-started_at").values_list("started_at", "duration_ms")[
            :LATENCY_SAMPLE_SIZE
        ]
    )
    sampled = len(sample) == LATENCY_SAMPLE_SIZE
    week = sorted(duration for _, duration in sample)
    day = sorted(duration for started, duration in sample if started >= now - DAY)

    def window(values: list[int], label: str) -> Latency:
        percentiles = {
            fraction: percentile(values, fraction) for fraction in PERCENTILES if values
        }
        return Latency(label, len(values), percentiles, sampled=sampled)

    return [window(day, "Last 24 hours"), window(week, "Last 7 days")]


def _key(fraction: float) -> str:
    return f"p{round(fraction * 100)}"


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Return the value at `fraction` of the ascending values `ordered`,
    interpolated linearly between the two nearest ranks as percentile_cont does."""
    if not ordered:
        raise ValueError("percentile() needs at least one value.")
    position = fraction * (len(ordered) - 1)
    lower = math.floor(position)
    upper = math.ceil(position)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def recent_failures(destination: Destination) -> list[Attempt]:
    """Return the latest failed attempts, test events included, with their
    delivery and event."""
    failed = Attempt.objects.filter(destination=destination).exclude(
        outcome=Outcome.SUCCESS
    )
    return list(
        failed.select_related("delivery", "delivery__event").order_by(
            "-started_at", "-pk"
        )[:RECENT_FAILURES]
    )


@dataclass(frozen=True)
class TestResult:
    delivery: Delivery
    attempt: Attempt | None

    @property
    def queued(self) -> bool:
        return self.delivery.status in (DeliveryStatus.PENDING, DeliveryStatus.SENDING)

    @property
    def succeeded(self) -> bool:
        return self.attempt is not None and self.attempt.outcome == Outcome.SUCCESS


def latest_test(destination: Destination) -> TestResult | None:
    """Return the latest test event's delivery and its latest attempt."""
    delivery = (
        Delivery.objects.filter(destination=destination, is_test=True)
        .order_by("-created_at", "-pk")
        .first()
    )
    if delivery is None:
        return None
    attempt = delivery.attempts.order_by("-started_at", "-pk").first()
    return TestResult(delivery, attempt)


# Events.


def event_deliveries(event: Event) -> list[Delivery]:
    """Return the event's deliveries with their attempts, oldest attempt first.

    Each delivery carries `blocked_by`: the id of the earliest unfinished earlier
    event of the same ordering key, which a pending delivery to an ordered
    destination waits for; None when it waits for nothing.
    """
    blocker = earlier_unfinished().order_by("event_time", "event_id")
    waits = Q(status=DeliveryStatus.PENDING) & ~Q(ordering_key="")
    attempts = Attempt.objects.order_by("started_at", "pk")
    deliveries = (
        Delivery.objects.filter(event=event)
        .select_related("destination")
        .annotate(
            waiting=waits & Exists(blocker),
            blocked_by=Subquery(blocker.values("event_id")[:1]),
        )
        .prefetch_related(Prefetch("attempts", queryset=attempts))
        .order_by("destination__name", "pk")
    )
    return list(deliveries)


# Replays.


@dataclass(frozen=True)
class ReplayProgress:
    counts: dict[str, int]

    def count(self, status: str) -> int:
        return self.counts.get(status, 0)

    @property
    def delivered(self) -> int:
        return self.count(DeliveryStatus.DELIVERED)

    @property
    def failed(self) -> int:
        return self.count(DeliveryStatus.FAILED)

    @property
    def held(self) -> int:
        return self.count(DeliveryStatus.HELD)

    @property
    def pending(self) -> int:
        """Deliveries still on their way: pending or being sent."""
        return self.count(DeliveryStatus.PENDING) + self.count(DeliveryStatus.SENDING)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> bool:
        """Whether nothing is left that a worker will send without help. Held
        deliveries wait for the destination to be enabled again."""
        return self.pending == 0


def replay_progress(replay: Replay) -> ReplayProgress:
    """Count the deliveries of the replay's events to its destination by status."""
    events = events_in_range(replay.destination, replay.start, replay.end)
    rows = (
        Delivery.objects.filter(destination=replay.destination, event__in=events)
        .values("status")
        .annotate(count=Count("pk"))
        .order_by()
    )
    return ReplayProgress({row["status"]: row["count"] for row in rows})
