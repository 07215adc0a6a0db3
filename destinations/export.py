"""CSV export of destinations, streamed row by row so thousands of them never sit
in memory at once. No secret goes out: Service Bus destinations show the masked
summary of their connection string."""

import csv
from collections.abc import Iterator
from typing import Any

from django.db.models import QuerySet
from django.http import StreamingHttpResponse
from django.utils import timezone

from delivery.summaries import with_delivery_figures

HEADER = (
    "id",
    "application",
    "stage",
    "kind",
    "name",
    "state",
    "target",
    "created_at",
    "updated_at",
    "last_delivery_status",
    "last_attempt_at",
    "success_rate_24h",
    "attempts_24h",
)
CHUNK_SIZE = 500
# A spreadsheet runs a cell that starts with one of these as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class _Line:
    """A file-like object whose write() hands the line back, for csv.writer."""

    def write(self, value: str) -> str:
        return value


def _text(value: str) -> str:
    return f"'{value}" if value.startswith(FORMULA_STARTS) else value


def _time(value: Any) -> str:
    return value.isoformat() if value is not None else ""


def _row(destination: Any) -> list[str | int]:
    total = destination.attempts_24h
    rate = f"{100 * destination.successes_24h / total:.1f}" if total else ""
    return [
        destination.pk,
        destination.application.slug,
        destination.stage,
        destination.kind,
        _text(destination.name),
        destination.state,
        _text(destination.target),
        _time(destination.created_at),
        _time(destination.updated_at),
        destination.last_outcome or "",
        _time(destination.last_attempt_at),
        rate,
        total,
    ]


def rows(destinations: QuerySet[Any]) -> Iterator[str]:
    """Yield the CSV's lines: the header, then one line per destination."""
    writer = csv.writer(_Line())
    yield writer.writerow(HEADER)
    destinations = destinations.select_related("application")
    if "last_outcome" not in destinations.query.annotations:
        destinations = with_delivery_figures(destinations)
    for destination in destinations.iterator(chunk_size=CHUNK_SIZE):
        yield writer.writerow(_row(destination))


def csv_response(destinations: QuerySet[Any]) -> StreamingHttpResponse:
    stamp = f"{timezone.now():%Y%m%d-%H%M%S}"
    return StreamingHttpResponse(
        rows(destinations),
        content_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="destinations-{stamp}.csv"'
        },
    )
