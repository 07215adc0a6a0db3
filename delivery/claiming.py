"""Claiming: which due deliveries a worker may lease now, with a key's run behind
each head on destinations that keep order.

A claim leases deliveries with FOR UPDATE SKIP LOCKED on PostgreSQL. On SQLite this
project opens transactions with BEGIN IMMEDIATE, which serialises claims instead.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import takewhile
from operator import itemgetter
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, F, Model, OuterRef, Q, QuerySet, Window
from django.db.models.base import ModelState
from django.db.models.expressions import RawSQL
from django.db.models.functions import RowNumber
from django.utils import timezone

from destinations.models import Application, Destination

from .models import UNFINISHED, Delivery, DeliveryStatus, Event
from .rows import attnames, column_list

# Up to this many deliveries, a claim reads their destinations in the same query.
JOINED_DESTINATION_LIMIT = 20
# The fields that sending and recording a claimed delivery read, of the delivery
# and of its event. The event's body is its stored envelope text; its data is read
# only for events without one.
SENT_DELIVERY_FIELDS = (
    "id",
    "event_id",
    "destination_id",
    "status",
    "ordering_key",
    "is_test",
    "attempt_count",
    "scheduled_at",
    "claimed_by",
)
SENT_EVENT_FIELDS = ("id", "type", "object_key", "time", "envelope_json")
SENT_FIELDS = (
    *SENT_DELIVERY_FIELDS[1:],
    *(f"event__{name}" for name in SENT_EVENT_FIELDS),
)


def pk_in(ids: list[int]) -> Q:
    """Return a filter on deliveries whose id is one of `ids`.

    On PostgreSQL, the ids travel as one array parameter. As an IN list, each id is
    a parameter of its own, which Django prepares and psycopg quotes into the query
    one by one: for a claim of hundreds, that took longer than running the query.
    """
    if ids and connection.vendor == "postgresql":
        return Q(pk__in=RawSQL("SELECT unnest(%s::bigint[])", [ids]))
    # An empty list runs no query at all.
    return Q(pk__in=ids)


def earlier_unfinished() -> QuerySet[Delivery]:
    """Return, for use in Exists() against an outer Delivery, the unfinished
    deliveries of the same destination and ordering key with an earlier event."""
    earlier = Q(event_time__lt=OuterRef("event_time")) | Q(
        event_time=OuterRef("event_time"), event_id__lt=OuterRef("event_id")
    )
    return Delivery.objects.filter(
        earlier,
        destination=OuterRef("destination"),
        ordering_key=OuterRef("ordering_key"),
        status__in=UNFINISHED,
    )


def sending_same_key() -> QuerySet[Delivery]:
    """Return, for use in Exists() against an outer Delivery, the deliveries of the
    same destination and ordering key that a worker is sending now."""
    return Delivery.objects.filter(
        destination=OuterRef("destination"),
        ordering_key=OuterRef("ordering_key"),
        status=DeliveryStatus.SENDING,
    )


def claimable(now: datetime) -> QuerySet[Delivery]:
    """Return the deliveries a worker may claim at `now`, as `claim` describes."""
    # Test events go out even to a paused or disabled destination: staff send them
    # to check a destination before enabling it.
    sendable = Q(is_test=True) | Q(
        destination__enabled=True, destination__paused_at__isnull=True
    )
    return (
        Delivery.objects.filter(status=DeliveryStatus.PENDING, next_attempt_at__lte=now)
        .filter(sendable)
        .filter(
            Q(ordering_key="")
            | (~Exists(earlier_unfinished()) & ~Exists(sending_same_key()))
        )
    )


@dataclass(frozen=True)
class Claim:
    deliveries: list[Delivery]
    # Whether due deliveries were left that another worker could take now.
    left_work: bool
    # When the lease on `deliveries` ends, or None when nothing was claimed.
    lease_until: datetime | None = None


def claim(worker: str, limit: int, share: int = 1) -> list[Delivery]:
    """Lease up to `limit` due deliveries to `worker` and return them, as
    `claim_round` describes."""
    return claim_round(worker, limit, share).deliveries


def claim_round(worker: str, limit: int, share: int = 1) -> Claim:
    """Lease up to `limit` due deliveries to `worker`.

    For a destination that keeps order, a delivery waits while one of the same
    ordering key with an earlier event (by time, then event id) is unfinished, so
    only the head of each key is due. It also waits while any delivery of its key is
    being sent: an older event that was retried or replayed must not go out
    alongside a newer one already in flight. A claimed head brings along the run of
    pending deliveries right behind it (`_runs`), which go out in the same
    call, in order. Keys are taken whole, oldest due head first, so that a claim
    that fills up leaves other keys to another worker.

    On PostgreSQL, FOR UPDATE SKIP LOCKED lets concurrent workers take disjoint
    heads. Only the worker that locked a key's head claims deliveries behind it.
    SQLite ignores the clause, but this project opens SQLite transactions with BEGIN
    IMMEDIATE, which serialises claims between processes instead.

    With `share` above 1, a claim that sees every due head (fewer than `limit`)
    takes only its part of them: `share` worker processes, less those sending
    now, split them, so that the idle ones can send the rest at the same time.
    Otherwise one claim could take every key in flight, and no other worker could
    send anything until it recorded its results. Leaving out the busy processes
    lets a worker whose siblings are busy take every head it finds, instead of
    halving what is left at each claim. Processes are counted, not the keys they
    send, because one process sending many keys in one batch leaves the others idle.
    """
    now = timezone.now()
    lease = Lease(worker, now, now + timedelta(seconds=settings.DELIVERY_LEASE_SECONDS))
    returning = connection.vendor == "postgresql"

    with transaction.atomic():
        heads = _lock_due_heads(now, limit)
        saw_all = len(heads) < limit
        if connection.vendor == "postgresql":
            heads = _keys_to_claim(heads)
        if not heads:
            return Claim([], left_work=False)
        available = len(heads)
        if share > 1 and saw_all:
            idle = max(1, share - _busy_workers(worker))
            heads = heads[: -(-available // idle)]
        runs = _runs(heads, now, limit)
        if returning:
            deliveries = _lease_returning(runs, lease)
        else:
            ids = _lease(runs, lease)

    if returning:
        ids = [delivery.pk for delivery in deliveries]
        _attach_destinations(deliveries)
    else:
        deliveries = _read_leased(ids, worker)
    _read_data_of_bare_events(deliveries)
    # In the order claimed: each run in its key's order as the database sorts event
    # ids, which may differ from Python's (a collation other than C).
    position = {pk: index for index, pk in enumerate(ids)}
    deliveries.sort(key=lambda delivery: position[delivery.pk])
    taken = sum(1 for head in heads if head[0] in position)
    return Claim(
        deliveries,
        left_work=not saw_all or taken < available,
        lease_until=lease.until,
    )


# The workers other than the claiming one that are sending now. Workers on other
# hosts count too, so a claim may take more than its host's share.
_BUSY_WORKERS_SQL = """
    SELECT count(DISTINCT claimed_by) FROM delivery_delivery
    WHERE status = 'sending' AND claimed_by <> %s
"""


def _busy_workers(worker: str) -> int:
    """Return how many workers other than `worker` are sending deliveries now."""
    with connection.cursor() as cursor:
        cursor.execute(_BUSY_WORKERS_SQL, [worker])
        (count,) = cursor.fetchone()
    return int(count or 0)


@dataclass(frozen=True)
class Lease:
    """A claim's worker, its time, and when its lease ends."""

    worker: str
    now: datetime
    until: datetime


def _lease(runs: list[list[int]], lease: Lease) -> list[int]:
    """Lease `runs` to the worker and return the ids leased. Each run ends before
    its first delivery behind the head that another claim holds or that changed
    since the claim read it. The caller holds the heads' row locks."""
    behind = [pk for run in runs for pk in run[1:]]
    unchanged = set()
    if behind:
        unchanged = set(
            Delivery.objects.filter(
                pk_in(behind),
                status=DeliveryStatus.PENDING,
                next_attempt_at__lte=lease.now,
            )
            # A row another claim holds ends the run, instead of waiting for it: a
            # staff replay can let two claims reach one key, and waiting could
            # deadlock.
            .select_for_update(skip_locked=True)
            .values_list("pk", flat=True)
        )
    kept, _ = _up_to_gaps(runs, unchanged | {run[0] for run in runs})
    Delivery.objects.filter(pk_in(kept), status=DeliveryStatus.PENDING).update(
        status=DeliveryStatus.SENDING,
        lease_expires_at=lease.until,
        claimed_by=lease.worker,
        updated_at=lease.now,
    )
    return kept


def _up_to_gaps(runs: list[list[int]], leased: set[int]) -> tuple[list[int], list[int]]:
    """Return the ids of `runs` up to each run's first id not in `leased`, and the
    leased ids after such a gap."""
    kept: list[int] = []
    after_gaps: list[int] = []
    for run in runs:
        length = len(list(takewhile(leased.__contains__, run)))
        kept += run[:length]
        after_gaps += [pk for pk in run[length:] if pk in leased]
    return kept, after_gaps


def _read_leased(ids: list[int], worker: str) -> list[Delivery]:
    """Read the deliveries `worker` leased, with their events and destinations."""
    claimed = Delivery.objects.filter(
        pk_in(ids), status=DeliveryStatus.SENDING, claimed_by=worker
    )
    if len(ids) <= JOINED_DESTINATION_LIMIT:
        return list(
            claimed.defer("event__data").select_related(
                "event", "destination", "destination__application"
            )
        )
    deliveries = list(claimed.only(*SENT_FIELDS).select_related("event"))
    _attach_destinations(deliveries)
    return deliveries


def _attach_destinations(deliveries: list[Delivery]) -> None:
    """Read the destinations of `deliveries`, each once: a claim shares one or a
    few, and a joined copy per delivery costs more than the extra query."""
    ids = list({delivery.destination_id for delivery in deliveries})
    if connection.vendor == "postgresql":
        destinations = _read_destinations(ids)
    else:
        destinations = Destination.objects.select_related("application").in_bulk(ids)
    # Set the relation's cache directly: the descriptor checks each instance it sets.
    destination_field = Delivery._meta.get_field("destination")
    for delivery in deliveries:
        destination_field.set_cached_value(
            delivery, destinations[delivery.destination_id]
        )


# A claim reads its destinations with this query, which Django would otherwise build
# and compile anew each time. The columns come from the models, not from input.
_DESTINATIONS_SQL = f"""
    SELECT {column_list(Destination, "t")}, {column_list(Application, "a")}
    FROM {Destination._meta.db_table} t
    JOIN {Application._meta.db_table} a ON a.id = t.application_id
    WHERE t.id = ANY(%s)
"""  # noqa: S608


def _read_destinations(ids: list[int]) -> dict[int, Destination]:
    """Return the destinations of `ids` by id, each with its application, on
    PostgreSQL."""
    names = attnames(Destination)
    application_names = attnames(Application)
    application_field = Destination._meta.get_field("application")
    with connection.cursor() as cursor:
        cursor.execute(_DESTINATIONS_SQL, [ids])
        rows = cursor.fetchall()
    destinations = {}
    for row in rows:
        destination = Destination.from_db(connection.alias, names, row[: len(names)])
        application = Application.from_db(
            connection.alias, application_names, row[len(names) :]
        )
        application_field.set_cached_value(destination, application)
        destinations[destination.pk] = destination
    return destinations


def _sent_columns(model: type[Model], names: tuple[str, ...]) -> list[str]:
    """Return the attnames of `names` in `model`'s field order, the order from_db
    takes values in."""
    return [
        field.attname for field in model._meta.concrete_fields if field.attname in names
    ]


_LEASED_DELIVERY_COLUMNS = _sent_columns(Delivery, SENT_DELIVERY_FIELDS)
_LEASED_EVENT_COLUMNS = _sent_columns(Event, SENT_EVENT_FIELDS)
# Locks the pending deliveries among the given ids that no other claim holds,
# leases them and returns them with their events, in one statement. A head is
# locked already, by this transaction, so it is never skipped. The columns come
# from the models, not from input.
_LEASE_SQL = f"""
    UPDATE delivery_delivery d
    SET status = 'sending',
        lease_expires_at = %(until)s,
        claimed_by = %(worker)s,
        updated_at = %(now)s
    FROM delivery_event e
    WHERE d.id IN (
            SELECT id FROM delivery_delivery
            WHERE id = ANY(%(ids)s)
                AND status = 'pending'
                AND next_attempt_at <= %(now)s
            FOR UPDATE SKIP LOCKED
        )
        AND e.id = d.event_id
    RETURNING {", ".join(f"d.{name}" for name in _LEASED_DELIVERY_COLUMNS)},
        {", ".join(f"e.{name}" for name in _LEASED_EVENT_COLUMNS)}
"""  # noqa: S608
_RELEASE_SQL = """
    UPDATE delivery_delivery
    SET status = 'pending', lease_expires_at = NULL, claimed_by = '',
        updated_at = %(now)s
    WHERE id = ANY(%(ids)s)
"""


def _lease_returning(runs: list[list[int]], lease: Lease) -> list[Delivery]:
    """Lease `runs` as `_lease` does, on PostgreSQL, and return the deliveries.

    One UPDATE locks, leases and reads them. A run whose row behind the head was
    skipped has its leased rows after that gap released again, which is rare."""
    ids = [pk for run in runs for pk in run]
    with connection.cursor() as cursor:
        cursor.execute(
            _LEASE_SQL,
            {
                "ids": ids,
                "now": lease.now,
                "until": lease.until,
                "worker": lease.worker,
            },
        )
        rows = {row[0]: row for row in cursor.fetchall()}
        kept, after_gaps = _up_to_gaps(runs, set(rows))
        if after_gaps:
            cursor.execute(_RELEASE_SQL, {"ids": after_gaps, "now": lease.now})
    split = len(_LEASED_DELIVERY_COLUMNS)
    event_field = Delivery._meta.get_field("event")
    deliveries = []
    for pk in kept:
        row = rows[pk]
        delivery = _loaded(Delivery, _LEASED_DELIVERY_COLUMNS, row[:split])
        event = _loaded(Event, _LEASED_EVENT_COLUMNS, row[split:])
        event_field.set_cached_value(delivery, event)
        deliveries.append(delivery)
    return deliveries


def _loaded[M: Model](
    model: type[M], attnames: list[str], values: tuple[object, ...]
) -> M:
    """Return an instance of `model` with the values of a row read from the
    database, as `from_db` returns it with the other fields deferred.

    It skips Model.__init__, which checks every field and sends the pre_init and
    post_init signals, at a quarter of the cost: a claim builds two instances per
    delivery. No receiver of those signals in this project takes these models.
    """
    instance = model.__new__(model)
    instance.__dict__.update(zip(attnames, values, strict=True))
    state = instance._state = ModelState()
    state.adding = False
    state.db = connection.alias
    return instance


def _read_data_of_bare_events(deliveries: list[Delivery]) -> None:
    """Read, in one query, the data of the claimed events that were stored without
    their envelope text (test events, for one): their body is built from it."""
    bare = {
        delivery.event_id: delivery.event
        for delivery in deliveries
        if not delivery.event.envelope_json
    }
    if bare:
        found = Event.objects.filter(pk__in=list(bare)).values_list("pk", "data")
        for pk, data in found:
            bare[pk].data = data


Head = tuple[int, int, str]

# The oldest due deliveries that a claim looks for heads among first (see
# _lock_due_heads).
DUE_SCAN_WINDOW = 1000

# The queries below find claimable() deliveries on PostgreSQL, written out because
# a claim runs them several times a second and Django took longer to build and
# compile its query than PostgreSQL took to run it. Each is built so that its plan
# holds when PostgreSQL's statistics are out of date, because a backlog builds up
# faster than ANALYZE runs. With statistics that counted no pending deliveries, a
# single query read every pending row once per pending row.

# Test events go out even to a paused or disabled destination: staff send them to
# check a destination before enabling it.
_SENDABLE = "(c.is_test OR (t.enabled AND t.paused_at IS NULL))"

# Returns, in due order, the candidates among the oldest due deliveries: those
# that keep no order, and those first in their key's line. Each key of the window
# costs one probe of delivery_unfinished_by_key, however long its line is.
_WINDOW_CANDIDATES_SQL = f"""
    WITH c AS MATERIALIZED (
        SELECT id, destination_id, ordering_key, is_test, next_attempt_at
        FROM delivery_delivery
        WHERE status = 'pending' AND next_attempt_at <= %(now)s
        ORDER BY next_attempt_at, id
        LIMIT %(window)s
    ), firsts AS MATERIALIZED (
        SELECT first.id
        FROM (
            SELECT DISTINCT destination_id, ordering_key FROM c
            WHERE ordering_key <> ''
        ) k
        CROSS JOIN LATERAL (
            SELECT id FROM delivery_delivery
            WHERE destination_id = k.destination_id
                AND ordering_key = k.ordering_key
                AND status IN ('pending', 'sending', 'held')
            ORDER BY event_time, event_id
            LIMIT 1
        ) first
    )
    SELECT c.id
    FROM c
    JOIN destinations_destination t ON t.id = c.destination_id
    WHERE {_SENDABLE}
        AND (c.ordering_key = '' OR c.id IN (SELECT id FROM firsts))
    ORDER BY c.next_attempt_at, c.id
"""  # noqa: S608
_WINDOW_FULL_SQL = """
    SELECT count(*) = %(window)s FROM (
        SELECT FROM delivery_delivery
        WHERE status = 'pending' AND next_attempt_at <= %(now)s
        LIMIT %(window)s
    ) w
"""
# Returns the candidates key by key. It walks the distinct (destination, ordering
# key) pairs of unfinished deliveries with one index probe each, because PostgreSQL
# 15 has no skip scan. Then it takes each key's first unfinished delivery if that
# one is pending and due. The key '' of a destination contains its deliveries that
# keep no order, and its oldest due ones count, up to the limit. Of a paused or
# disabled destination, only its test deliveries count, because otherwise its
# held-back backlog would fill the limit ahead of them. The cost grows with the keys
# that have unfinished deliveries, not with the deliveries in their lines.
_KEY_CANDIDATES_SQL = f"""
    WITH RECURSIVE keys AS (
        (
            SELECT destination_id, ordering_key FROM delivery_delivery
            WHERE status IN ('pending', 'sending', 'held')
            ORDER BY destination_id, ordering_key
            LIMIT 1
        )
        UNION ALL
        SELECT next.destination_id, next.ordering_key
        FROM keys k
        CROSS JOIN LATERAL (
            SELECT destination_id, ordering_key FROM delivery_delivery
            WHERE status IN ('pending', 'sending', 'held')
                AND (destination_id, ordering_key)
                    > (k.destination_id, k.ordering_key)
            ORDER BY destination_id, ordering_key
            LIMIT 1
        ) next
    )
    SELECT c.id
    FROM keys k
    JOIN destinations_destination t ON t.id = k.destination_id
    CROSS JOIN LATERAL (
        (
            SELECT id, status, next_attempt_at, is_test FROM delivery_delivery
            WHERE destination_id = k.destination_id
                AND ordering_key = k.ordering_key
                AND status IN ('pending', 'sending', 'held')
                AND (k.ordering_key <> ''
                    OR (status = 'pending' AND next_attempt_at <= %(now)s))
                AND (k.ordering_key <> '' OR (t.enabled AND t.paused_at IS NULL))
            ORDER BY event_time, event_id
            LIMIT CASE WHEN k.ordering_key = '' THEN %(limit)s ELSE 1 END
        )
        UNION ALL
        -- NOTE: this reads the destination's whole backlog if PostgreSQL plans it
        -- on delivery_unfinished_by_key instead of delivery_test_by_destination.
        (
            SELECT id, status, next_attempt_at, is_test FROM delivery_delivery
            WHERE k.ordering_key = '' AND NOT (t.enabled AND t.paused_at IS NULL)
                AND destination_id = k.destination_id
                AND is_test
                AND ordering_key = ''
                AND status = 'pending' AND next_attempt_at <= %(now)s
            LIMIT %(limit)s
        )
    ) c
    WHERE c.status = 'pending' AND c.next_attempt_at <= %(now)s AND {_SENDABLE}
"""  # noqa: S608
# The candidates that are still pending and due and whose key no worker is sending
# (a retried or replayed older event waits for a newer one in flight), oldest due
# first. Each is read by its id. NOT IN runs its query once, as a hash of the few
# keys in flight.
_HEADS_OF_CANDIDATES_SQL = """
    SELECT d.id, d.destination_id, d.ordering_key
    FROM delivery_delivery d
    WHERE d.id = ANY(%(ids)s::bigint[])
        AND d.status = 'pending'
        AND d.next_attempt_at <= %(now)s
        AND (d.ordering_key = '' OR (d.destination_id, d.ordering_key) NOT IN (
            SELECT destination_id, ordering_key FROM delivery_delivery
            WHERE status = 'sending'
        ))
    ORDER BY d.next_attempt_at, d.id
    LIMIT %(limit)s
"""
# The same, locked, skipping rows that another claim has locked.
_LOCK_HEADS_SQL = _HEADS_OF_CANDIDATES_SQL + "FOR UPDATE OF d SKIP LOCKED"


def _lock_due_heads(now: datetime, limit: int) -> list[Head]:
    """Lock up to `limit` of the deliveries claimable at `now`, oldest due first,
    and return them as heads. Rows that another claim has locked are skipped."""
    if connection.vendor == "postgresql":
        return _due_heads(now, limit, _LOCK_HEADS_SQL)
    locked = (
        claimable(now)
        .order_by("next_attempt_at", "pk")
        .select_for_update(skip_locked=True, of=("self",))
    )
    return list(locked.values_list("pk", "destination_id", "ordering_key")[:limit])


def has_claimable(now: datetime) -> bool:
    """Return whether a worker could claim a delivery at `now`."""
    if connection.vendor == "postgresql":
        return bool(_due_heads(now, 1, _HEADS_OF_CANDIDATES_SQL))
    return claimable(now).exists()


def _due_heads(now: datetime, limit: int, heads_sql: str) -> list[Head]:
    """Return up to `limit` of the deliveries claimable at `now` on PostgreSQL,
    oldest due first, read with `heads_sql` from the candidates.

    The candidates come from the oldest DUE_SCAN_WINDOW due deliveries first, which
    is enough when heads are many among them. When fewer than a quarter of `limit`
    are, and more due deliveries lie beyond the window, they are found again key by
    key. Long lines behind few heads (a backlog after an outage, a key waiting for
    its head's retry) then neither slow every claim down nor keep the heads behind
    them from being found.
    """
    parameters: dict[str, Any] = {
        "now": now,
        "limit": limit,
        "window": DUE_SCAN_WINDOW,
    }
    with connection.cursor() as cursor:
        cursor.execute(_WINDOW_CANDIDATES_SQL, parameters)
        candidates = [pk for (pk,) in cursor.fetchall()]
        heads = _heads_of(cursor, heads_sql, parameters, candidates)
        # Count the heads, not the candidates: a candidate whose key is being sent,
        # or that another claim has locked, is not claimed.
        if len(heads) >= max(1, limit // 4):
            return heads
        cursor.execute(_WINDOW_FULL_SQL, parameters)
        (full,) = cursor.fetchone()
        if not full:
            return heads
        cursor.execute(_KEY_CANDIDATES_SQL, parameters)
        # The heads found already stay candidates: `heads_sql` may have locked them.
        found = [pk for (pk,) in cursor.fetchall()]
        candidates = list(dict.fromkeys([*found, *(head[0] for head in heads)]))
        return _heads_of(cursor, heads_sql, parameters, candidates)


def _heads_of(
    cursor: Any, heads_sql: str, parameters: dict[str, Any], candidates: list[int]
) -> list[Head]:
    """Return the heads that `heads_sql` reads from `candidates`."""
    if not candidates:
        return []
    cursor.execute(heads_sql, {**parameters, "ids": candidates})
    return [tuple(row) for row in cursor.fetchall()]


def _columns(heads: list[Head]) -> tuple[list[int], list[int], list[str]]:
    """Return the heads' ids, destination ids and ordering keys as three lists, the
    arrays that the queries below unnest."""
    return (
        [pk for pk, _, _ in heads],
        [destination for _, destination, _ in heads],
        [key for _, _, key in heads],
    )


# Takes a transaction-level advisory lock per (destination, ordering key), unless
# another claim holds it, and returns the heads whose key it locked.
_KEY_LOCKS_SQL = """
    SELECT h.head
    FROM unnest(%s::bigint[], %s::bigint[], %s::text[])
        AS h(head, destination_id, ordering_key)
    WHERE pg_try_advisory_xact_lock(
        hashtextextended(h.destination_id::text || '/' || h.ordering_key, 0)
    )
"""
# The keys among the given ones that a worker is sending now.
_KEYS_SENDING_SQL = """
    SELECT DISTINCT destination_id, ordering_key
    FROM delivery_delivery
    WHERE status = 'sending'
        AND (destination_id, ordering_key) IN (
            SELECT * FROM unnest(%s::bigint[], %s::text[])
        )
"""


def _keys_to_claim(heads: list[Head]) -> list[Head]:
    """Return the `heads` this claim may take on PostgreSQL: unkeyed ones, and those
    whose ordering key it locked and that no worker is sending now.

    A head's row lock alone does not give its key to one claim. The claim's query
    reads a snapshot, so it can miss a delivery of the same key that a concurrent
    claim marked as sending, and a staff retry or replay can make an older delivery
    of that key a new head. The key lock lasts until this transaction commits. The
    check for deliveries being sent runs after it, in a new snapshot, so it reads
    every claim of the key that committed before.
    """
    keyed = [head for head in heads if head[2]]
    if not keyed:
        return heads
    with connection.cursor() as cursor:
        cursor.execute(_KEY_LOCKS_SQL, list(_columns(keyed)))
        locked = {pk for (pk,) in cursor.fetchall()}
        owned = [head for head in keyed if head[0] in locked]
        cursor.execute(_KEYS_SENDING_SQL, list(_columns(owned)[1:]))
        sending = set(cursor.fetchall())
    free = {head[0] for head in owned if (head[1], head[2]) not in sending}
    return [head for head in heads if not head[2] or head[0] in free]


def _runs(heads: list[Head], now: datetime, limit: int) -> list[list[int]]:
    """Return the runs to claim: each of the locked `heads` (id, destination id,
    ordering key) with the ids of the run behind it, in head order, at most `limit`
    ids in all.

    The run behind a head of an ordering key is the deliveries of its key that
    follow it without a gap: each pending and due, at most DELIVERY_RUN_SIZE with
    the head. The first that is not (held, waiting for a retry, being sent) ends
    it. A run cut short by `limit` stays a prefix of its key's line. Leasing ends a
    run early at a row another claim holds.
    """
    size = settings.DELIVERY_RUN_SIZE
    keyed = [head for head in heads if head[2]]
    lines = dict(zip(keyed, _lines(keyed, size), strict=True)) if size > 1 else {}

    runs: list[list[int]] = []
    total = 0
    for head in heads:
        if total >= limit:
            break
        run = [head[0]]
        for pk, status, due_at in lines.get(head, []):
            if len(run) + total >= limit:
                break
            if status != DeliveryStatus.PENDING or due_at is None or due_at > now:
                break
            run.append(pk)
        runs.append(run)
        total += len(run)
    return runs


LineEntry = tuple[int, str, datetime | None]

# One index scan of delivery_unfinished_by_key per key, stopping after the run's
# size, however long the key's backlog is.
_LINES_SQL = """
    SELECT h.head, d.id, d.status, d.next_attempt_at
    FROM unnest(%s::bigint[], %s::bigint[], %s::text[])
        AS h(head, destination_id, ordering_key)
    CROSS JOIN LATERAL (
        SELECT id, status, next_attempt_at, event_time, event_id
        FROM delivery_delivery
        WHERE destination_id = h.destination_id
            AND ordering_key = h.ordering_key
            AND status = ANY(%s::text[])
        ORDER BY event_time, event_id
        LIMIT %s
    ) AS d
    ORDER BY h.head, d.event_time, d.event_id
"""


def _lines(heads: list[Head], size: int) -> list[list[LineEntry]]:
    """Return, per head, the (id, status, next attempt) of the unfinished deliveries
    behind it in its key's line, at most `size` - 1, in event order.

    A line whose first delivery is no longer the head (an earlier event arrived
    after the claim's query) is returned empty: nothing goes out behind that head.
    """
    unfinished = [str(status) for status in UNFINISHED]
    rows: dict[int, list[tuple[int, str, datetime | None]]] = {}
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                _LINES_SQL,
                [
                    *_columns(heads),
                    unfinished,
                    size,
                ],
            )
            for head, pk, status, due_at in cursor.fetchall():
                rows.setdefault(head, []).append((pk, status, due_at))
    else:
        by_key = {(destination, key): pk for pk, destination, key in heads}
        position = Window(
            RowNumber(),
            partition_by=[F("destination_id"), F("ordering_key")],
            order_by=[F("event_time").asc(), F("event_id").asc()],
        )
        found = (
            Delivery.objects.filter(
                status__in=unfinished,
                destination_id__in={destination for _, destination, _ in heads},
                ordering_key__in={key for _, _, key in heads},
            )
            .annotate(position=position)
            .filter(position__lte=size)
            .values_list(
                "destination_id",
                "ordering_key",
                "pk",
                "status",
                "next_attempt_at",
                "position",
            )
        )
        for destination, key, pk, status, due_at, _ in sorted(found, key=itemgetter(5)):
            head = by_key.get((destination, key))
            if head is not None:
                rows.setdefault(head, []).append((pk, status, due_at))

    lines = []
    for pk, _, _ in heads:
        line = rows.get(pk, [])
        lines.append(line[1:] if line and line[0][0] == pk else [])
    return lines
