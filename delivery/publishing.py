"""Publishing: record events and fan them out to their destinations.

`publish` and `publish_many` write the Event rows and one Delivery per destination in
the caller's transaction, so an event is recorded with its deliveries or not at all,
and workers are woken only after commit.
"""

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from destinations.models import Application, Destination, Stage

from .jsontext import has_invalid_text, invalid_text
from .models import Delivery, DeliveryStatus, Event
from .object_keys import MissingField, object_key
from .rows import Row, attnames, column_list, copy_rows

logger = logging.getLogger(__name__)

MAX_ID_LENGTH = Event._meta.get_field("id").max_length or 64
MAX_TYPE_LENGTH = Event._meta.get_field("type").max_length or 100
MAX_KEY_LENGTH = Event._meta.get_field("object_key").max_length or 512
# Event ids appear in URLs and as message ids: keep to URL-safe characters.
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
# The JSON escapes of UTF-16 surrogates, \ud800 to \udfff, in either case.
SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")


class InvalidEvent(ValueError):
    """An envelope that cannot be recorded; the message names the field and value."""


@dataclass(frozen=True)
class Envelope:
    id: str
    time: datetime
    type: str
    data: dict[str, Any]
    object_key: str
    # The envelope's text as published, sent to partners byte for byte.
    raw: str


@dataclass
class PublishResult:
    recorded: int = 0
    duplicates: int = 0
    deliveries: int = 0
    held: int = 0
    # Ids already recorded for another application or stage: not published here,
    # because an event id is unique across the platform.
    conflicts: list[str] = field(default_factory=list)


def parse_envelope(raw: str | dict[str, Any]) -> Envelope:
    """Check an envelope `{"id", "time", "type", "data"}` and derive its ordering
    key. Raise InvalidEvent naming the field, the value and the fix."""
    if isinstance(raw, str):
        text = raw.strip()
        # A NUL escape is checked on the decoded strings below, because the text
        # \\u0000 (an escaped backslash, then u0000) contains it too.
        if "\x00" in text:
            raise InvalidEvent(
                "The envelope contains a NUL character, which no destination "
                "accepts in text. Remove it from the event."
            )
        try:
            envelope = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as error:
            raise InvalidEvent(
                f"The envelope is not valid JSON ({error.msg} at character "
                f"{error.pos}). Publish one JSON object per line."
            ) from error
        except RecursionError as error:
            raise InvalidEvent(
                "The envelope nests objects or arrays too deeply to read. Flatten "
                "the event's data."
            ) from error
    else:
        envelope = raw
        text = json.dumps(raw, separators=(",", ":"), ensure_ascii=False)
    if not isinstance(envelope, dict):
        raise InvalidEvent(
            f"The envelope is a JSON {type(envelope).__name__}, not an object. "
            'Publish {"id": ..., "time": ..., "type": ..., "data": {...}}.'
        )
    # Only a dict, or a text with a surrogate escape (\ud800 to \udfff) or a NUL
    # escape, can hold such text. Most hold none, so the walk is skipped.
    plain_text = (
        isinstance(raw, str)
        and "\\u0000" not in text
        and not SURROGATE_ESCAPE_RE.search(text)
    )
    if not plain_text or has_invalid_text(text):
        _reject_invalid_text(envelope)

    event_id = _text(envelope, "id", MAX_ID_LENGTH)
    event_type = _text(envelope, "type", MAX_TYPE_LENGTH)
    time = _time(envelope)
    data = envelope.get("data")
    if not isinstance(data, dict):
        raise InvalidEvent(
            f"data is {data!r:.80}, not a JSON object. Put the event's payload in "
            '"data": {...}.'
        )
    try:
        key = object_key(event_type, data, event_id)
    except MissingField as error:
        raise InvalidEvent(f"Event {event_id}: {error}") from error
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidEvent(
            f"Event {event_id}: its object key {key[:80]!r}... is {len(key)} "
            f"characters long; the limit is {MAX_KEY_LENGTH}. Shorten the object ids."
        )
    return Envelope(event_id, time, event_type, data, key, text)


def _reject_invalid_text(envelope: dict[str, Any]) -> None:
    """Raise InvalidEvent naming the first key or string of `envelope` that
    contains a NUL or a lone surrogate."""
    for path, value in invalid_text(envelope):
        if "\x00" in value:
            raise InvalidEvent(
                f"{path} is {value!r:.80}, which contains a NUL character. No "
                "destination accepts NUL in text. Remove it from the event."
            )
        raise InvalidEvent(
            f"{path} is {value!r:.80}, which contains a lone surrogate (a \\ud800 "
            "to \\udfff escape without its pair). UTF-8 cannot encode it, so no "
            "destination can receive it. Send the character itself, or both "
            "escapes of its surrogate pair, such as \\ud83d\\ude00."
        )


def _reject_constant(name: str) -> None:
    raise InvalidEvent(
        f"The envelope contains {name}, which is not valid JSON. Send numbers only."
    )


def _text(envelope: dict[str, Any], name: str, max_length: int) -> str:
    value = envelope.get(name)
    if name not in envelope or value is None:
        raise InvalidEvent(
            f"{name} is missing; it must be a non-empty string. Give every envelope "
            f"its {name}."
        )
    if not isinstance(value, str) or not value.strip():
        raise InvalidEvent(
            f"{name} is {value!r:.80}; it must be a non-empty string. Give every "
            f"envelope its {name}."
        )
    if len(value) > max_length:
        raise InvalidEvent(
            f"{name} {value[:80]!r}... is {len(value)} characters long; the limit is "
            f"{max_length}."
        )
    if name == "id" and not ID_RE.fullmatch(value):
        raise InvalidEvent(
            f"id {value[:80]!r} has characters other than letters, digits and "
            "'.', '_', ':', '-'. Use the platform's ULID event ids."
        )
    return value


def _time(envelope: dict[str, Any]) -> datetime:
    value = envelope.get("time")
    try:
        parsed = parse_datetime(value) if isinstance(value, str) else None
        # In UTC: Python reads offsets with seconds and their fractions, which
        # PostgreSQL's timestamptz input rejects. Far-off offsets overflow here.
        if parsed is not None and timezone.is_aware(parsed):
            parsed = parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        parsed = None
    if parsed is None or timezone.is_naive(parsed):
        raise InvalidEvent(
            f"time is {value!r:.80}; it must be an ISO-8601 date-time with a time "
            "zone, such as 2025-03-03T08:00:40.017Z."
        )
    return parsed


def publish(
    application: Application, stage: str, envelope: Envelope | str | dict[str, Any]
) -> PublishResult:
    """Record one event and its deliveries in the caller's transaction."""
    if not isinstance(envelope, Envelope):
        envelope = parse_envelope(envelope)
    return publish_many(application, stage, [envelope])


def publish_many(
    application: Application, stage: str, envelopes: Iterable[Envelope]
) -> PublishResult:
    """Record events, in the order given, with one delivery per destination.

    An event id that is already recorded is skipped, with its deliveries. Enabled
    destinations get pending deliveries. Destinations the engine paused or disabled
    get held ones, which go out when they are enabled again. Destinations that
    staff disabled get none.
    """
    from .tasks import wake_workers

    if not isinstance(application, Application) or application.pk is None:
        raise ValueError(
            f"application must be a saved Application, not {application!r}"
        )
    if stage not in Stage.values:
        raise ValueError(f"stage is {stage!r}; it must be one of {Stage.values}.")

    result = PublishResult()
    unique: dict[str, Envelope] = {}
    for envelope in envelopes:
        if envelope.id in unique:
            result.duplicates += 1
        else:
            unique[envelope.id] = envelope
    if not unique:
        return result

    with transaction.atomic():
        # Read inside the transaction, so a destination enabled meanwhile does not
        # get held deliveries; the sweep releases any that a race leaves behind.
        destinations = [
            destination
            for destination in _destinations(application, stage)
            if destination.enabled or destination.holds_deliveries
        ]
        recorded = _recorded(list(unique))
        known = set()
        for event_id, application_id, event_stage in recorded:
            known.add(event_id)
            if application_id != application.pk or event_stage != stage:
                result.conflicts.append(event_id)
        fresh = [envelope for envelope in unique.values() if envelope.id not in known]
        result.duplicates += len(known) - len(result.conflicts)
        result.recorded = len(fresh)
        now = timezone.now()
        events = [_event(application, stage, envelope, now) for envelope in fresh]
        deliveries = [
            _delivery(envelope, destination, now)
            for envelope in fresh
            for destination in destinations
        ]
        foreign_ids = _insert(events, deliveries)
        if foreign_ids:
            result.conflicts += [
                envelope.id for envelope in fresh if envelope.id in foreign_ids
            ]
            result.recorded -= len(foreign_ids)
            deliveries = [
                row for row in deliveries if row["event_id"] not in foreign_ids
            ]
        result.deliveries = len(deliveries)
        result.held = sum(
            delivery["status"] == DeliveryStatus.HELD for delivery in deliveries
        )
        if deliveries:
            transaction.on_commit(partial(wake_workers, len(deliveries)))
    return result


# Two queries of every publish, written out for PostgreSQL: Django took longer to
# build and compile them than PostgreSQL took to run them. The columns come from the
# models, not from input.
_DESTINATIONS_SQL = f"""
    SELECT {column_list(Destination, "t")}
    FROM {Destination._meta.db_table} t
    WHERE t.application_id = %s AND t.stage = %s
    ORDER BY t.id
"""  # noqa: S608
_RECORDED_SQL = f"""
    SELECT id, application_id, stage FROM {Event._meta.db_table} WHERE id = ANY(%s)
"""  # noqa: S608


def _destinations(application: Application, stage: str) -> list[Destination]:
    """Return the destinations of `application` and `stage`."""
    if connection.vendor != "postgresql":
        return list(Destination.objects.filter(application=application, stage=stage))
    names = attnames(Destination)
    with connection.cursor() as cursor:
        cursor.execute(_DESTINATIONS_SQL, [application.pk, stage])
        rows = cursor.fetchall()
    return [Destination.from_db(connection.alias, names, row) for row in rows]


def _recorded(event_ids: list[str]) -> list[tuple[str, int, str]]:
    """Return (id, application id, stage) of the events of `event_ids` that are
    recorded."""
    if connection.vendor != "postgresql":
        found = Event.objects.filter(pk__in=event_ids)
        return list(found.values_list("pk", "application_id", "stage"))
    with connection.cursor() as cursor:
        cursor.execute(_RECORDED_SQL, [event_ids])
        return [tuple(row) for row in cursor.fetchall()]


def _insert(events: list[Row], deliveries: list[Row]) -> set[str]:
    """Insert new events of one application and stage and their deliveries, given
    as column values by field attname. Return the ids that a concurrent publisher
    recorded for another application or stage: their deliveries are left out.

    On PostgreSQL, COPY takes the rows in a fraction of the time an INSERT of many
    rows needs. It fails whole on a duplicate key. Known ids were left out, so only a
    concurrent publisher of the same event id can cause one. The rows then go in
    again with INSERT ... ON CONFLICT DO NOTHING, which skips the events the other
    publisher recorded, and their deliveries by their unique constraint.
    """
    if connection.vendor == "postgresql":
        try:
            with transaction.atomic():
                copy_rows(Event, events)
                copy_rows(Delivery, deliveries)
            return set()
        except IntegrityError:
            logger.info(
                "COPY found an event id that another publisher recorded meanwhile; "
                "inserting %d events with ON CONFLICT DO NOTHING",
                len(events),
            )
    Event.objects.bulk_create([Event(**row) for row in events], ignore_conflicts=True)
    # The unique constraint on (event, destination) does not stop a delivery of an
    # event that the other publisher recorded for another application or stage, so
    # such events are left out here.
    foreign_ids = _recorded_elsewhere(events)
    if foreign_ids:
        logger.warning(
            "Skipping events that another publisher recorded meanwhile for another "
            "application or stage: %s",
            ", ".join(sorted(foreign_ids)),
        )
    Delivery.objects.bulk_create(
        [Delivery(**row) for row in deliveries if row["event_id"] not in foreign_ids],
        ignore_conflicts=True,
    )
    return foreign_ids


def _recorded_elsewhere(events: list[Row]) -> set[str]:
    """Return the ids of `events` that are stored for another application or stage
    than the one the rows give."""
    if not events:
        return set()
    stored = Event.objects.filter(pk__in=[row["id"] for row in events]).exclude(
        application_id=events[0]["application_id"], stage=events[0]["stage"]
    )
    return set(stored.values_list("pk", flat=True))


def _event(
    application: Application, stage: str, envelope: Envelope, now: datetime
) -> Row:
    return {
        "id": envelope.id,
        "application_id": application.pk,
        "stage": stage,
        "type": envelope.type,
        "object_key": envelope.object_key,
        "time": envelope.time,
        "data": envelope.data,
        "envelope_json": envelope.raw,
        "is_test": False,
        "recorded_at": now,
    }


def _delivery(envelope: Envelope, destination: Destination, now: datetime) -> Row:
    held = destination.holds_deliveries
    return {
        "event_id": envelope.id,
        "destination_id": destination.pk,
        "status": DeliveryStatus.HELD if held else DeliveryStatus.PENDING,
        "ordering_key": envelope.object_key if destination.is_ordered else "",
        "event_time": envelope.time,
        "is_test": False,
        "attempt_count": 0,
        "next_attempt_at": now,
        "scheduled_at": now,
        "lease_expires_at": None,
        "claimed_by": "",
        "created_at": now,
        "updated_at": now,
    }
