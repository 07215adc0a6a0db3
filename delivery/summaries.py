"""Per-destination delivery figures for lists of destinations, each a subquery.

Each figure is a correlated subquery over Attempt's (destination, is_test,
started_at) indexes, so it costs a few index entries per destination. A list page
reads them with `attach()` for its own rows only.
"""

from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from destinations.models import Destination

from .models import Attempt, Outcome

RECENT = timedelta(hours=24)


def _count(attempts: QuerySet[Attempt]) -> Coalesce:
    counted = (
        attempts.order_by()
        .values("destination")
        .annotate(total=Count("pk"))
        .values("total")
    )
    return Coalesce(Subquery(counted, output_field=IntegerField()), 0)


def with_delivery_figures(
    destinations: QuerySet[Any] | None = None, now: datetime | None = None
) -> QuerySet[Any]:
    """Annotate destinations with their latest attempt (last_outcome,
    last_attempt_at), their latest failed one (last_error_at) and their attempts
    of the last 24 hours (attempts_24h, successes_24h). Test events are left out:
    they tell nothing about the destination's live traffic."""
    if destinations is None:
        destinations = Destination.objects.all()
    since = (now or timezone.now()) - RECENT
    live = Attempt.objects.filter(destination=OuterRef("pk"), is_test=False)
    latest = live.order_by("-started_at")
    failed = latest.exclude(outcome=Outcome.SUCCESS)
    recent = live.filter(started_at__gte=since)
    return destinations.annotate(
        last_outcome=Subquery(latest.values("outcome")[:1]),
        last_attempt_at=Subquery(latest.values("started_at")[:1]),
        last_error_at=Subquery(failed.values("started_at")[:1]),
        attempts_24h=_count(recent),
        successes_24h=_count(recent.filter(outcome=Outcome.SUCCESS)),
    )


def attach(destinations: list[Any], annotated: QuerySet[Any]) -> list[Any]:
    """Set the annotations of `annotated` on each of `destinations`, read in one
    query for their ids only, and return them."""
    names = list(annotated.query.annotations)
    ids = [destination.pk for destination in destinations]
    rows = annotated.filter(pk__in=ids).order_by().values("pk", *names)
    found = {row.pop("pk"): row for row in rows}
    for destination in destinations:
        values = found.get(destination.pk, {})
        for name in names:
            setattr(destination, name, values.get(name))
    return destinations


def success_rate(destination: Any) -> str:
    """Return "97.5% of 40" for an annotated destination, or "-" when it had no
    attempt in the last 24 hours."""
    total = getattr(destination, "attempts_24h", 0)
    if not total:
        return "-"
    rate = 100 * destination.successes_24h / total
    return f"{rate:.1f}% of {total}".replace(".0%", "%")


def last_status(destination: Any) -> str:
    """Return "Delivered 2025-03-03 08:00" for an annotated destination's latest
    attempt, or "-" when it has none."""
    outcome = getattr(destination, "last_outcome", None)
    if outcome is None:
        return "-"
    label = Outcome(outcome).label
    return f"{label} {destination.last_attempt_at:%Y-%m-%d %H:%M}"
