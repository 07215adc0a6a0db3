"""Claims on PostgreSQL that race with each other or with staff actions.

A key's run goes out in the database's (event_time, event id) order. One key has one
owner at a time, even when a replay makes an older event its head mid-claim."""

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from delivery import claiming, engine, tasks
from delivery.models import Delivery, DeliveryStatus
from delivery.replay import replay
from destinations.models import Destination

from .delivery_doubles import (
    BASE_TIME,
    Script,
    install_transport,
    make_application,
    make_destination,
    queue_events,
    run_until_idle,
)

KEY = "4102/st-1/order/a"

needs_postgresql = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="needs PostgreSQL"
)


# The session's Celery worker, once started, shares the test database and claims
# whatever is due. Deliveries due only on a clock a day ahead keep it out of the
# tests whose transactions other connections see.
CLOCK_SHIFT = timedelta(days=1)


@pytest.fixture
def transport(monkeypatch: pytest.MonkeyPatch) -> Script:
    return install_transport(monkeypatch)


@pytest.fixture
def clock_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + CLOCK_SHIFT)


@pytest.fixture
def fifo() -> Destination:
    return make_destination(make_application(), ordered=True)


def database_order(destination: Destination) -> list[str]:
    """Return the key's event ids in the engine's SQL order: event_time, event_id."""
    return list(
        Delivery.objects.filter(destination=destination, ordering_key=KEY)
        .order_by("event_time", "event_id")
        .values_list("event_id", flat=True)
    )


# Order within a run.


@needs_postgresql
@pytest.mark.django_db
def test_run_sent_in_database_order(
    fifo: Destination, transport: Script, settings: Any
) -> None:
    # A database whose collation is not C, as one created with en_US.UTF-8 or an
    # ICU locale: "order-a" sorts before "order-B", unlike in Python.
    with connection.cursor() as cursor:
        cursor.execute(
            "ALTER TABLE delivery_delivery ALTER COLUMN event_id "
            'TYPE varchar(64) COLLATE "en-US-x-icu"'
        )
    # Two events of one key at the same millisecond.
    queue_events(fifo, [("order-B", KEY, 1), ("order-a", KEY, 1)])
    assert database_order(fifo) == ["order-a", "order-B"]

    # One delivery per round: the engine's own order, head first.
    settings.DELIVERY_RUN_SIZE = 1
    heads = [delivery.event_id for delivery in engine.claim("probe", 10)]
    assert heads == ["order-a"]
    Delivery.objects.update(status=DeliveryStatus.PENDING, claimed_by="")

    settings.DELIVERY_RUN_SIZE = 20
    run_until_idle()

    assert transport.sent == ["order-a", "order-B"]


# A replay during a claim.


class Claims:
    """Claims run in threads named after their worker, each on its own database
    connection; their claimed event ids and errors, by worker."""

    def __init__(self) -> None:
        self.claimed: dict[str, list[str]] = {}
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []

    def start(self, worker: str) -> None:
        thread = threading.Thread(target=self._claim, args=(worker,), name=worker)
        self.threads.append(thread)
        thread.start()

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)

    def _claim(self, worker: str) -> None:
        try:
            claimed = engine.claim(worker, 10)
            self.claimed[worker] = [delivery.event_id for delivery in claimed]
        except Exception as error:
            self.errors.append(f"{worker}: {type(error).__name__}: {error}")
        finally:
            connection.close()


@needs_postgresql
@pytest.mark.django_db(transaction=True)
def test_replay_during_claim_one_owner(
    monkeypatch: pytest.MonkeyPatch, clock_ahead: None
) -> None:
    monkeypatch.setattr(tasks, "wake_workers", lambda *args: None)
    destination = make_destination(make_application(), ordered=True)
    deliveries = queue_events(
        destination,
        [
            ("e1", KEY, 1),
            ("e2", KEY, 2),
            ("e3", KEY, 3),
            ("e6", KEY, 6),
            ("e7", KEY, 7),
        ],
    )
    Delivery.objects.filter(
        pk__in=[deliveries[e].pk for e in ("e1", "e2", "e3")]
    ).update(status=DeliveryStatus.DELIVERED, next_attempt_at=None)

    first_locked = threading.Event()
    go_on = threading.Event()
    real_runs = claiming._runs

    def runs(heads: Any, now: Any, limit: int) -> list[list[int]]:
        # Worker A stops between locking its head and reading its line.
        if threading.current_thread().name == "A":
            first_locked.set()
            assert go_on.wait(10)
        return real_runs(heads, now, limit)

    monkeypatch.setattr(claiming, "_runs", runs)
    claims = Claims()

    claims.start("A")
    assert first_locked.wait(10), f"A never reached its line: {claims.errors}"
    # Staff replay the key's first three events while A's claim is open.
    replay(destination, BASE_TIME, BASE_TIME + timedelta(seconds=4))
    claims.start("B")
    time.sleep(1.0)  # B locks e1 and waits for A's lock on e6.
    go_on.set()
    claims.join(10)

    assert claims.errors == []
    sending = Delivery.objects.filter(
        destination=destination, ordering_key=KEY, status=DeliveryStatus.SENDING
    )
    owners = set(sending.values_list("claimed_by", flat=True))
    assert len(owners) <= 1, f"one key claimed by {sorted(owners)}: {claims.claimed}"


@needs_postgresql
@pytest.mark.django_db(transaction=True)
def test_replay_during_claim_no_deadlock(
    monkeypatch: pytest.MonkeyPatch, clock_ahead: None
) -> None:
    monkeypatch.setattr(tasks, "wake_workers", lambda *args: None)
    destination = make_destination(make_application(), ordered=True)
    # e7's row comes before e6's, as for an event published late.
    deliveries = queue_events(
        destination,
        [("e1", KEY, 1), ("e2", KEY, 2), ("e7", KEY, 7), ("e6", KEY, 6)],
    )
    Delivery.objects.filter(pk__in=[deliveries[e].pk for e in ("e1", "e2")]).update(
        status=DeliveryStatus.DELIVERED, next_attempt_at=None
    )

    line_read = threading.Event()
    go_on = threading.Event()
    real_lines = claiming._lines

    def lines(heads: Any, size: int) -> Any:
        found = real_lines(heads, size)
        # Worker A stops after reading its line [e6, e7], before locking e7.
        if threading.current_thread().name == "A":
            line_read.set()
            assert go_on.wait(10)
        return found

    monkeypatch.setattr(claiming, "_lines", lines)
    claims = Claims()

    claims.start("A")
    assert line_read.wait(10)
    replay(destination, BASE_TIME, BASE_TIME + timedelta(seconds=3))
    claims.start("B")
    time.sleep(1.0)  # B locks e1, then e7, and waits for A's lock on e6.
    go_on.set()
    claims.join(15)

    assert claims.errors == []
    assert sorted(claims.claimed) == ["A", "B"]
    sending = Delivery.objects.filter(
        destination=destination, ordering_key=KEY, status=DeliveryStatus.SENDING
    )
    assert set(sending.values_list("claimed_by", flat=True)) == {"A"}


# A row behind a head that another transaction holds.


@needs_postgresql
@pytest.mark.django_db(transaction=True)
def test_locked_row_ends_run(fifo: Destination, clock_ahead: None) -> None:
    deliveries = queue_events(
        fifo, [("e1", KEY, 1), ("e2", KEY, 2), ("e3", KEY, 3), ("e4", KEY, 4)]
    )
    locked = threading.Event()
    release = threading.Event()

    def hold_e3() -> None:
        try:
            with transaction.atomic():
                Delivery.objects.select_for_update().get(pk=deliveries["e3"].pk)
                locked.set()
                release.wait(10)
        finally:
            connection.close()

    holder = threading.Thread(target=hold_e3)
    holder.start()
    try:
        assert locked.wait(10)
        claimed = engine.claim("worker-1", 10)
    finally:
        release.set()
        holder.join(10)

    assert [delivery.event_id for delivery in claimed] == ["e1", "e2"]
    statuses = dict(
        Delivery.objects.filter(destination=fifo).values_list("event_id", "status")
    )
    # e4 was leased with the rest and released again: it must not overtake e3.
    assert statuses == {
        "e1": DeliveryStatus.SENDING,
        "e2": DeliveryStatus.SENDING,
        "e3": DeliveryStatus.PENDING,
        "e4": DeliveryStatus.PENDING,
    }
    assert Delivery.objects.get(pk=deliveries["e4"].pk).claimed_by == ""


def test_runs_end_at_first_gap() -> None:
    runs = [[1, 2, 3, 4], [5, 6], [7, 8]]

    kept, after_gaps = claiming._up_to_gaps(runs, {1, 2, 4, 5, 6, 8})

    assert kept == [1, 2, 5, 6]
    assert after_gaps == [4, 8]
