"""The delivery engine: claims with leases, order per key, retries, attempts and the
lease guard, driven through a recording transport.

The last tests claim from two threads at once, and run two real Celery worker
processes that send to a FIFO queue on the SQS peer."""

import gc
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from celery.signals import worker_init, worker_process_init
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from delivery import claiming, engine, tasks
from delivery.claiming import claimable
from delivery.models import (
    Attempt,
    Delivery,
    DeliveryStatus,
    Outcome,
)
from delivery.peers.sqs import SqsPeer, peer_environment, sqs_client
from delivery.publishing import parse_envelope, publish_many
from delivery.retry import retry_delay
from delivery.transports import Failure, Sent
from destinations.models import Application, Destination, Stage

from .conftest import (
    AWS_VARIABLES,
    TEST_ENCRYPTION_KEY,
    WORKER_START_SECONDS,
    Worker,
    database_url,
)
from .delivery_doubles import (
    BASE_TIME,
    FIFO_QUEUE_URL,
    THROTTLED,
    TOO_LARGE,
    Script,
    add_event,
    install_transport,
    make_application,
    make_destination,
    make_due,
    queue_delivery,
    queue_events,
    run_until_idle,
    status_of,
)

if TYPE_CHECKING:
    from .conftest import PeerQueue

pytestmark = pytest.mark.django_db

KEY_A = "4102/st-1/order/a"
KEY_B = "4102/st-1/order/b"
KEY_C = "4102/st-1/order/c"


@pytest.fixture
def transport(monkeypatch: pytest.MonkeyPatch) -> Script:
    return install_transport(monkeypatch)


@pytest.fixture
def application() -> Application:
    return make_application()


@pytest.fixture
def fifo(application: Application) -> Destination:
    return make_destination(application, ordered=True)


@pytest.fixture
def standard(application: Application) -> Destination:
    return make_destination(application, ordered=False)


def claimed_ids(deliveries: list[Delivery]) -> list[str]:
    return sorted(delivery.event_id for delivery in deliveries)


def set_status(delivery: Delivery, status: str, **fields: Any) -> None:
    Delivery.objects.filter(pk=delivery.pk).update(status=status, **fields)


# Claiming.


def test_claim_returns_only_due_pending(fifo: Destination) -> None:
    later = timezone.now() + timedelta(minutes=5)
    deliveries = queue_events(
        fifo,
        [
            ("due", KEY_A, 1),
            ("later", KEY_B, 2),
            ("delivered", KEY_C, 3),
            ("failed", "4102/st-1/order/d", 4),
            ("held", "4102/st-1/order/e", 5),
            ("sending", "4102/st-1/order/f", 6),
        ],
    )
    set_status(deliveries["later"], DeliveryStatus.PENDING, next_attempt_at=later)
    set_status(deliveries["delivered"], DeliveryStatus.DELIVERED)
    set_status(deliveries["failed"], DeliveryStatus.FAILED)
    set_status(deliveries["held"], DeliveryStatus.HELD)
    set_status(deliveries["sending"], DeliveryStatus.SENDING, claimed_by="other")

    claimed = engine.claim("worker-1", limit=10)

    assert claimed_ids(claimed) == ["due"]


# With a window of one delivery, the claim finds its heads key by key.
@pytest.mark.parametrize(
    "window", [claiming.DUE_SCAN_WINDOW, 1], ids=["window", "key_by_key"]
)
def test_claim_query_matches_claimable(
    application: Application,
    fifo: Destination,
    standard: Destination,
    window: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(claiming, "DUE_SCAN_WINDOW", window)
    later = timezone.now() + timedelta(minutes=5)
    keys = {name: f"4102/st-1/order/{name}" for name in "abcdefg"}
    ordered = queue_events(
        fifo,
        [
            *[
                (f"{name}{n}", key, n)
                for name, key in keys.items()
                for n in (1, 2)
                if name != "g"
            ],
            # The same time: the lower event id goes first.
            ("g2", keys["g"], 1),
            ("g1", keys["g"], 1),
        ],
    )
    set_status(ordered["b1"], DeliveryStatus.SENDING, claimed_by="other")
    set_status(ordered["c1"], DeliveryStatus.HELD)
    set_status(ordered["d1"], DeliveryStatus.PENDING, next_attempt_at=later)
    set_status(ordered["e1"], DeliveryStatus.DELIVERED)
    # A replayed older event waits while a newer one of its key is in flight.
    set_status(ordered["f2"], DeliveryStatus.SENDING, claimed_by="other")
    unordered = queue_events(
        standard, [("u1", KEY_A, 1), ("u2", KEY_A, 2), ("u3", KEY_B, 3)]
    )
    set_status(unordered["u3"], DeliveryStatus.PENDING, next_attempt_at=later)
    paused = make_destination(
        application,
        name="Paused",
        sqs_queue_url=FIFO_QUEUE_URL.replace("orders", "paused"),
        paused_at=timezone.now(),
    )
    queue_events(paused, [("p1", KEY_A, 1)])
    test_event = add_event(application, "t1", KEY_B, BASE_TIME)
    queue_delivery(paused, test_event, ordering_key=KEY_B, is_test=True)
    off = make_destination(
        application,
        name="Off",
        sqs_queue_url=FIFO_QUEUE_URL.replace("orders", "off"),
        enabled=False,
    )
    queue_events(off, [("x1", KEY_A, 1)])

    now = timezone.now()
    with transaction.atomic():
        heads = claiming._lock_due_heads(now, limit=100)
    locked = Delivery.objects.filter(pk__in=[pk for pk, _, _ in heads])

    expected = ["a1", "e2", "g1", "t1", "u1", "u2"]
    assert sorted(claimable(now).values_list("event_id", flat=True)) == expected
    assert sorted(locked.values_list("event_id", flat=True)) == expected


def test_long_waiting_line_hides_no_other_head(
    fifo: Destination, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(claiming, "DUE_SCAN_WINDOW", 4)
    deliveries = queue_events(
        fifo,
        [*[(f"a{n}", KEY_A, n) for n in range(1, 9)], ("b1", KEY_B, 20)],
    )
    # Key A's head waits for its retry. The seven behind it are due and older than
    # key B's head, so they fill the window of the oldest due deliveries.
    later = timezone.now() + timedelta(hours=1)
    set_status(deliveries["a1"], DeliveryStatus.PENDING, next_attempt_at=later)

    claimed = engine.claim("worker-1", limit=10)

    assert claimed_ids(claimed) == ["b1"]


@pytest.mark.parametrize(
    "window", [claiming.DUE_SCAN_WINDOW, 1], ids=["window", "key_by_key"]
)
def test_due_work_leaves_out_waiting_lines(
    fifo: Destination, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(claiming, "DUE_SCAN_WINDOW", window)
    deliveries = queue_events(fifo, [(f"a{n}", KEY_A, n) for n in range(1, 4)])
    later = timezone.now() + timedelta(hours=1)
    set_status(deliveries["a1"], DeliveryStatus.PENDING, next_attempt_at=later)

    waiting_only = engine.has_due_work()
    queue_events(fifo, [("b1", KEY_B, 4)])
    with_head = engine.has_due_work()

    assert waiting_only is False
    assert with_head is True


def test_claim_leases_to_worker(fifo: Destination, settings: Any) -> None:
    settings.DELIVERY_LEASE_SECONDS = 90
    delivery = queue_events(fifo, [("a1", KEY_A, 1)])["a1"]
    before = timezone.now()

    engine.claim("worker-1", limit=10)

    after = timezone.now()
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.SENDING
    assert delivery.claimed_by == "worker-1"
    assert delivery.lease_expires_at is not None
    assert delivery.lease_expires_at >= before + timedelta(seconds=90)
    assert delivery.lease_expires_at <= after + timedelta(seconds=90)


def test_claim_takes_oldest_due_first(standard: Destination) -> None:
    deliveries = queue_events(standard, [("e1", KEY_A, 1), ("e2", KEY_B, 2)])
    Delivery.objects.filter(pk=deliveries["e1"].pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    Delivery.objects.filter(pk=deliveries["e2"].pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=30)
    )

    claimed = engine.claim("worker-1", limit=1)

    assert claimed_ids(claimed) == ["e2"]


def test_claimed_delivery_not_claimed_again(standard: Destination) -> None:
    queue_events(standard, [("e1", KEY_A, 1)])
    engine.claim("worker-1", limit=10)

    claimed = engine.claim("worker-2", limit=10)

    assert claimed == []


# Order per ordering key.


def test_claim_takes_head_and_run(fifo: Destination, settings: Any) -> None:
    settings.DELIVERY_RUN_SIZE = 2
    queue_events(
        fifo,
        [
            ("a1", KEY_A, 1),
            ("b1", KEY_B, 2),
            ("a2", KEY_A, 3),
            ("c1", KEY_C, 4),
            ("a3", KEY_A, 5),
            ("b2", KEY_B, 6),
        ],
    )

    claimed = engine.claim("worker-1", limit=10)

    assert claimed_ids(claimed) == ["a1", "a2", "b1", "b2", "c1"]


def test_run_size_one_claims_heads_only(fifo: Destination, settings: Any) -> None:
    settings.DELIVERY_RUN_SIZE = 1
    queue_events(fifo, [("a1", KEY_A, 1), ("a2", KEY_A, 2), ("b1", KEY_B, 3)])

    claimed = engine.claim("worker-1", limit=10)

    assert claimed_ids(claimed) == ["a1", "b1"]


@pytest.mark.parametrize(
    ("status", "retry_in"),
    [
        (DeliveryStatus.HELD, None),
        (DeliveryStatus.PENDING, timedelta(minutes=5)),
    ],
    ids=["held", "waiting-for-retry"],
)
def test_run_ends_at_blocked_delivery(
    fifo: Destination, status: str, retry_in: timedelta | None
) -> None:
    deliveries = queue_events(
        fifo, [("a1", KEY_A, 1), ("a2", KEY_A, 2), ("a3", KEY_A, 3)]
    )
    next_attempt_at = timezone.now() + retry_in if retry_in else None
    set_status(deliveries["a2"], status, next_attempt_at=next_attempt_at)

    claimed = engine.claim("worker-1", limit=10)

    # a3 is due, but sending it before a2 would break the key's order.
    assert claimed_ids(claimed) == ["a1"]


def test_full_claim_takes_oldest_keys_whole(fifo: Destination) -> None:
    deliveries = queue_events(
        fifo,
        [
            ("a1", KEY_A, 1),
            ("a2", KEY_A, 2),
            ("a3", KEY_A, 3),
            ("b1", KEY_B, 4),
            ("b2", KEY_B, 5),
            ("c1", KEY_C, 6),
        ],
    )
    set_status(deliveries["b1"], DeliveryStatus.PENDING, next_attempt_at=BASE_TIME)

    first = engine.claim("worker-1", limit=4)
    second = engine.claim("worker-2", limit=4)

    # b1 has waited longest, so its key goes first; a's run is cut to fit.
    assert claimed_ids(first) == ["a1", "a2", "b1", "b2"]
    # The other worker takes the keys the first one left: c, but not a, whose
    # head is being sent.
    assert claimed_ids(second) == ["c1"]


def test_no_run_behind_stale_head(fifo: Destination) -> None:
    deliveries = queue_events(
        fifo, [("a1", KEY_A, 1), ("a2", KEY_A, 2), ("a3", KEY_A, 3)]
    )
    # As if a1 arrived after the claim's query had picked a2 as the head.
    not_head = deliveries["a2"]
    head = (not_head.pk, fifo.pk, KEY_A)

    with transaction.atomic():
        runs = claiming._runs([head], timezone.now(), limit=10)

    assert runs == [[not_head.pk]]


def test_ordered_keys_flow_independently(fifo: Destination, transport: Script) -> None:
    queue_events(
        fifo,
        [
            ("a1", KEY_A, 1),
            ("b1", KEY_B, 2),
            ("c1", KEY_C, 3),
            ("a2", KEY_A, 4),
            ("c2", KEY_C, 5),
            ("a3", KEY_A, 6),
        ],
    )

    run_until_idle()

    batches = [[message.event_id for message in batch] for batch in transport.batches]
    # One call, each key's run together and in order.
    assert batches == [["a1", "a2", "a3", "b1", "c1", "c2"]]


def test_run_goes_in_event_order(fifo: Destination, transport: Script) -> None:
    queue_events(fifo, [("a3", KEY_A, 3), ("a1", KEY_A, 1), ("a2", KEY_A, 2)])

    run_until_idle()

    assert transport.batches == [transport.batches[0]]
    assert transport.sent == ["a1", "a2", "a3"]


def test_failed_head_holds_back_run(fifo: Destination, transport: Script) -> None:
    deliveries = queue_events(
        fifo,
        [("a1", KEY_A, 1), ("a2", KEY_A, 2), ("a3", KEY_A, 3), ("b1", KEY_B, 4)],
    )
    transport.then("a1", THROTTLED)

    run_until_idle()

    assert transport.sent == ["a1", "b1"]
    for event_id in ("a2", "a3"):
        delivery = Delivery.objects.get(pk=deliveries[event_id].pk)
        assert delivery.status == DeliveryStatus.PENDING
        assert delivery.attempt_count == 0
        assert not delivery.attempts.exists()
        assert delivery.claimed_by == ""
    head = Delivery.objects.get(pk=deliveries["a1"].pk)
    assert head.attempt_count == 1
    assert head.next_attempt_at is not None
    assert head.next_attempt_at > timezone.now()

    make_due()
    run_until_idle()

    assert transport.sent == ["a1", "b1", "a1", "a2", "a3"]
    assert transport.batches[-1] == transport.batches[-1][:3]


def test_mid_run_failure_keeps_earlier(fifo: Destination, transport: Script) -> None:
    deliveries = queue_events(
        fifo, [("a1", KEY_A, 1), ("a2", KEY_A, 2), ("a3", KEY_A, 3)]
    )
    transport.then("a2", THROTTLED)

    run_until_idle()

    assert transport.sent == ["a1", "a2"]
    assert status_of(deliveries["a1"]) == DeliveryStatus.DELIVERED
    a3 = Delivery.objects.get(pk=deliveries["a3"].pk)
    assert (a3.status, a3.attempt_count) == (DeliveryStatus.PENDING, 0)
    assert Attempt.objects.filter(delivery__event_id="a3").count() == 0


def test_message_failure_lets_run_go_on(fifo: Destination, transport: Script) -> None:
    deliveries = queue_events(
        fifo, [("a1", KEY_A, 1), ("a2", KEY_A, 2), ("a3", KEY_A, 3)]
    )
    transport.then("a1", TOO_LARGE)

    run_until_idle()

    assert transport.sent == ["a1", "a2", "a3"]
    assert len(transport.batches) == 1
    assert status_of(deliveries["a1"]) == DeliveryStatus.FAILED
    assert status_of(deliveries["a3"]) == DeliveryStatus.DELIVERED


def test_send_past_failure_is_logged(
    fifo: Destination, transport: Script, caplog: pytest.LogCaptureFixture
) -> None:
    deliveries = queue_events(fifo, [("a1", KEY_A, 1), ("a2", KEY_A, 2)])
    transport.ignores_order = True
    transport.then("a1", THROTTLED)

    run_until_idle()

    # What was sent is recorded as sent; the broken order is reported, not hidden.
    assert status_of(deliveries["a2"]) == DeliveryStatus.DELIVERED
    assert "a2 went out to destination" in caplog.text
    assert "arrived out of order" in caplog.text


def test_transient_head_blocks_only_its_key(
    fifo: Destination, transport: Script
) -> None:
    deliveries = queue_events(
        fifo,
        [
            ("a1", KEY_A, 1),
            ("b1", KEY_B, 2),
            ("a2", KEY_A, 3),
            ("b2", KEY_B, 4),
            ("b3", KEY_B, 5),
        ],
    )
    transport.then("a1", THROTTLED)

    run_until_idle()

    assert transport.sent_with_key(KEY_A) == ["a1"]
    assert transport.sent_with_key(KEY_B) == ["b1", "b2", "b3"]
    assert status_of(deliveries["a1"]) == DeliveryStatus.PENDING
    assert status_of(deliveries["a2"]) == DeliveryStatus.PENDING
    assert status_of(deliveries["b3"]) == DeliveryStatus.DELIVERED


def test_blocked_key_resumes_in_order(fifo: Destination, transport: Script) -> None:
    deliveries = queue_events(
        fifo,
        [("a1", KEY_A, 1), ("a2", KEY_A, 2), ("b1", KEY_B, 3), ("a3", KEY_A, 4)],
    )
    transport.then("a1", THROTTLED)
    run_until_idle()

    make_due()
    run_until_idle()

    assert transport.sent_with_key(KEY_A) == ["a1", "a1", "a2", "a3"]
    assert {status_of(delivery) for delivery in deliveries.values()} == {
        DeliveryStatus.DELIVERED
    }


def test_order_follows_event_time_not_creation(
    fifo: Destination, transport: Script
) -> None:
    # Created newest first: the order of the rows must not matter.
    queue_events(fifo, [("a3", KEY_A, 30), ("a1", KEY_A, 10), ("a2", KEY_A, 20)])

    run_until_idle()

    assert transport.sent_with_key(KEY_A) == ["a1", "a2", "a3"]


def test_same_time_events_go_by_id(fifo: Destination, transport: Script) -> None:
    queue_events(fifo, [("a-2", KEY_A, 10), ("a-3", KEY_A, 10), ("a-1", KEY_A, 10)])

    run_until_idle()

    assert transport.sent_with_key(KEY_A) == ["a-1", "a-2", "a-3"]


@pytest.mark.parametrize(("events", "calls"), [(5, 1), (2, 1), (1, 0)])
def test_full_claim_wakes_one_worker(
    standard: Destination, transport: Script, settings: Any, events: int, calls: int
) -> None:
    settings.DELIVERY_CLAIM_SIZE = 2
    queue_events(standard, [(f"e{n}", f"order-{n}", n) for n in range(events)])
    woken: list[int] = []

    more = engine.drain("worker-1", 60.0, on_backlog=lambda: woken.append(1))

    assert more is False
    assert len(woken) == calls
    assert len(transport.sent) == events


def test_shared_claim_leaves_keys_to_siblings(fifo: Destination, settings: Any) -> None:
    settings.DELIVERY_RUN_SIZE = 2
    queue_events(
        fifo, [("a1", KEY_A, 1), ("b1", KEY_B, 2), ("c1", KEY_C, 3), ("a2", KEY_A, 4)]
    )

    first = claiming.claim_round("worker-1", limit=10, share=2)
    second = claiming.claim_round("worker-2", limit=10, share=2)

    # Two of the three keys, whole and oldest first; the other worker takes the
    # one left, which is all it can see.
    assert claimed_ids(first.deliveries) == ["a1", "a2", "b1"]
    assert first.left_work is True
    assert claimed_ids(second.deliveries) == ["c1"]
    assert second.left_work is False


def test_shared_claim_leaves_out_busy_sibling(fifo: Destination) -> None:
    keys = [f"order-{n}" for n in range(6)]
    queue_events(fifo, [(f"e{n}", key, n) for n, key in enumerate(keys)])
    unordered = make_destination(fifo.application, ordered=False)
    queue_events(unordered, [("u1", "order-1", 10), ("u2", "order-1", 11)])

    first = claiming.claim_round("worker-1", limit=20, share=2)
    second = claiming.claim_round("worker-2", limit=20, share=2)

    # Half of the 8 keys (each unkeyed delivery is one): worker-1 takes the 4
    # oldest. worker-2 is the only idle process while worker-1 sends, so it takes
    # all 4 it finds, instead of half of them.
    assert claimed_ids(first.deliveries) == ["e0", "e1", "e2", "e3"]
    assert first.left_work is True
    assert sorted(claimed_ids(second.deliveries)) == ["e4", "e5", "u1", "u2"]
    assert second.left_work is False


def test_shared_claim_one_busy_sibling(fifo: Destination) -> None:
    queue_events(fifo, [(f"s{n}", f"busy-{n}", n) for n in range(20)])
    busy = claiming.claim_round("worker-2", limit=20)
    queue_events(fifo, [(f"e{n}", f"order-{n}", 30 + n) for n in range(8)])

    claimed = claiming.claim_round("worker-1", limit=20, share=4)

    # worker-2 sends 20 keys in one batch, but it is one process: two of the four
    # processes are idle besides worker-1, so this claim leaves them 5 of the 8 keys.
    assert len(busy.deliveries) == 20
    assert len(claimed.deliveries) == 3
    assert claimed.left_work is True


def test_shared_claim_of_backlog_fills_limit(standard: Destination) -> None:
    queue_events(standard, [(f"e{n}", f"order-{n}", n) for n in range(5)])

    claimed = claiming.claim_round("worker-1", limit=4, share=2)

    # More are due than one claim takes, so there is no reason to take less.
    assert len(claimed.deliveries) == 4
    assert claimed.left_work is True


def test_drain_wakes_sibling_before_sending(
    fifo: Destination, transport: Script
) -> None:
    queue_events(fifo, [("a1", KEY_A, 1), ("b1", KEY_B, 2)])
    sent_when_woken: list[int] = []

    engine.drain(
        "worker-1",
        60.0,
        on_backlog=lambda: sent_when_woken.append(len(transport.sent)),
        share=2,
    )

    assert sent_when_woken == [0]
    assert sorted(transport.sent) == ["a1", "b1"]


@dataclass(frozen=True)
class StartingWorker:
    """What a worker_init receiver reads of Celery's WorkController."""

    concurrency: int | str


def test_worker_start_sets_claim_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "pool_size", 1)

    worker_init.send(sender=StartingWorker(concurrency=3))
    three = tasks.pool_size
    worker_init.send(sender=StartingWorker(concurrency="auto"))

    assert three == 3
    assert tasks.pool_size == (os.cpu_count() or 1)


def test_worker_process_start_freezes_objects() -> None:
    gc.unfreeze()
    try:
        worker_process_init.send(sender=None)
        frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()

    assert frozen > 0


# Builds Celery's WorkController for each pool, as `celery worker` does before it
# starts the pool, and prints the claim share that worker_init set. The command
# line passes the pool as a class, the worker_pool setting as a name.
POOL_SHARE_SCRIPT = """
import django

django.setup()

from celery.concurrency.solo import TaskPool
from celery.worker import WorkController

from delivery import tasks
from portal.celery import app

for pool in ("solo", TaskPool, "prefork", "threads"):
    WorkController(app=app, pool_cls=pool, concurrency=3)
    print(tasks.pool_size)
"""


@pytest.mark.parametrize("pool", ["solo", "solo class", "prefork", "threads"])
def test_worker_pool_sets_claim_share(pool: str, pool_shares: dict[str, int]) -> None:
    # A solo pool runs one task at a time in the worker's own process, so it has no
    # sibling to leave keys to, whatever --concurrency is set to.
    expected = 1 if pool.startswith("solo") else 3

    assert pool_shares[pool] == expected


@pytest.fixture(scope="module")
def pool_shares() -> dict[str, int]:
    environment = {
        name: value for name, value in os.environ.items() if name not in AWS_VARIABLES
    }
    environment.update(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "ENV_FILE": "",
            "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
        }
    )
    finished = subprocess.run(
        [sys.executable, "-c", POOL_SHARE_SCRIPT],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    shares = [int(line) for line in finished.stdout.split()]
    return dict(zip(["solo", "solo class", "prefork", "threads"], shares, strict=True))


def test_send_due_claims_pool_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "pool_size", 4)
    calls: list[dict[str, Any]] = []

    def drain(*arguments: Any, **options: Any) -> bool:
        calls.append(options)
        return False

    monkeypatch.setattr(engine, "drain", drain)

    tasks.send_due()

    assert [options["share"] for options in calls] == [4]


def test_round_queries_do_not_grow_with_claim(
    standard: Destination, transport: Script
) -> None:
    queries = []
    for first, events in ((0, 25), (100, 50)):
        queue_events(
            standard, [(f"e{n}", f"order-{n}", n) for n in range(first, first + events)]
        )
        with CaptureQueriesContext(connection) as captured:
            assert engine.run_once("worker-1") == events
        queries.append(len(captured))

    # Claiming, reading, sending and recording take the same queries for any
    # number of deliveries: none reads a field of one delivery on its own.
    assert queries[0] == queries[1]


def test_update_of_no_ids_runs_no_query() -> None:
    with CaptureQueriesContext(connection) as captured:
        changed = Delivery.objects.filter(claiming.pk_in([])).update(claimed_by="")

    assert changed == 0
    assert len(captured) == 0


def test_unordered_claims_all_due_at_once(standard: Destination) -> None:
    queue_events(standard, [("a1", KEY_A, 1), ("a2", KEY_A, 2), ("a3", KEY_A, 3)])

    claimed = engine.claim("worker-1", limit=10)

    assert claimed_ids(claimed) == ["a1", "a2", "a3"]


def test_unordered_failure_blocks_nothing(
    standard: Destination, transport: Script
) -> None:
    deliveries = queue_events(
        standard, [("a1", KEY_A, 1), ("a2", KEY_A, 2), ("a3", KEY_A, 3)]
    )
    transport.then("a1", THROTTLED)

    run_until_idle()

    assert status_of(deliveries["a1"]) == DeliveryStatus.PENDING
    assert status_of(deliveries["a2"]) == DeliveryStatus.DELIVERED
    assert status_of(deliveries["a3"]) == DeliveryStatus.DELIVERED


def test_message_failure_fails_and_key_moves_on(
    fifo: Destination, transport: Script
) -> None:
    deliveries = queue_events(fifo, [("a1", KEY_A, 1), ("a2", KEY_A, 2)])
    transport.then("a1", TOO_LARGE)

    run_until_idle()

    fifo.refresh_from_db()
    assert transport.sent_with_key(KEY_A) == ["a1", "a2"]
    assert status_of(deliveries["a1"]) == DeliveryStatus.FAILED
    assert status_of(deliveries["a2"]) == DeliveryStatus.DELIVERED
    assert fifo.paused_at is None
    assert fifo.consecutive_failures == 0


# Retries.


def test_transient_failures_back_off_exponentially(
    application: Application, transport: Script
) -> None:
    destination = make_destination(
        application, retry_initial_delay=10, retry_max_delay=60
    )
    delivery = queue_events(destination, [("a1", KEY_A, 1)])["a1"]
    transport.then("a1", *[THROTTLED] * 6)

    for attempt in range(1, 7):
        make_due()
        before = timezone.now()
        engine.run_once("worker-1")
        after = timezone.now()

        delivery.refresh_from_db()
        base = timedelta(seconds=min(60, 10 * 2 ** (attempt - 1)))
        assert delivery.attempt_count == attempt
        assert delivery.next_attempt_at is not None
        assert delivery.next_attempt_at >= before + base / 2
        assert delivery.next_attempt_at <= after + base


def test_retry_delay_draws_equal_jitter(fifo: Destination) -> None:
    fifo.retry_initial_delay = 5
    fifo.retry_max_delay = 300
    rng = random.Random(20250303)

    for attempt in range(1, 12):
        delay = retry_delay(fifo, attempt, rng)

        base = min(300, 5 * 2 ** (attempt - 1))
        assert delay >= timedelta(seconds=base / 2)
        assert delay <= timedelta(seconds=base)


def test_retry_delay_repeats_for_seed(fifo: Destination) -> None:
    first = [retry_delay(fifo, n, random.Random(7)) for n in range(1, 6)]
    second = [retry_delay(fifo, n, random.Random(7)) for n in range(1, 6)]

    assert first == second


def test_retry_delay_caps_huge_attempt_counts(fifo: Destination) -> None:
    delay = retry_delay(fifo, 10_000, random.Random(1))

    assert delay <= timedelta(seconds=fifo.retry_max_delay)


def test_transient_failure_after_window_fails(
    application: Application, transport: Script
) -> None:
    destination = make_destination(application, retry_window=1)
    delivery = queue_events(destination, [("a1", KEY_A, 1)])["a1"]
    # The window started an hour and a minute ago: the failure comes too late.
    Delivery.objects.filter(pk=delivery.pk).update(
        scheduled_at=timezone.now() - timedelta(hours=1, minutes=1)
    )
    transport.then("a1", THROTTLED)

    engine.run_once("worker-1")

    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.FAILED
    assert delivery.next_attempt_at is None
    assert delivery.attempt_count == 1


def test_transient_failure_inside_window_retries(
    application: Application, transport: Script
) -> None:
    destination = make_destination(application, retry_window=1)
    delivery = queue_events(destination, [("a1", KEY_A, 1)])["a1"]
    Delivery.objects.filter(pk=delivery.pk).update(
        scheduled_at=timezone.now() - timedelta(minutes=59)
    )
    transport.then("a1", THROTTLED)

    engine.run_once("worker-1")

    assert status_of(delivery) == DeliveryStatus.PENDING


# Attempts.


def test_every_attempt_is_recorded(fifo: Destination, transport: Script) -> None:
    delivery = queue_events(fifo, [("a1", KEY_A, 1)])["a1"]
    transport.then("a1", THROTTLED)
    transport.delay_seconds = 0.02
    run_until_idle()
    make_due()

    run_until_idle()

    failed, sent = delivery.attempts.order_by("started_at")
    assert failed.outcome == Outcome.TRANSIENT_ERROR
    assert failed.error_kind == THROTTLED.kind
    assert failed.message == THROTTLED.message
    assert failed.duration_ms >= 20
    assert sent.outcome == Outcome.SUCCESS
    assert sent.remote_message_id == "remote-a1"
    assert sent.duration_ms >= 20


def test_attempt_with_nul_in_remote_text_recorded(
    standard: Destination, transport: Script
) -> None:
    # A service's error message or message id is remote text, and PostgreSQL
    # rejects a NUL in text: the whole record would fail and the deliveries would
    # stay leased until the lease expired, to be sent again.
    deliveries = queue_events(standard, [("a1", KEY_A, 1), ("b1", KEY_B, 2)])
    transport.then(
        "a1", Failure(kind="service_error", message="bad\x00 reply", permanent=False)
    )
    transport.then("b1", Sent(remote_message_id="id\x00"))

    engine.run_once("worker-1")

    assert status_of(deliveries["a1"]) == DeliveryStatus.PENDING
    assert status_of(deliveries["b1"]) == DeliveryStatus.DELIVERED
    failed = deliveries["a1"].attempts.get()
    assert failed.message == "bad\ufffd reply"
    sent = deliveries["b1"].attempts.get()
    assert sent.remote_message_id == "id\ufffd"
    standard.refresh_from_db()
    assert standard.last_error == "service_error: bad\ufffd reply"


def test_permanent_failure_attempt_recorded(
    fifo: Destination, transport: Script
) -> None:
    delivery = queue_events(fifo, [("a1", KEY_A, 1)])["a1"]
    transport.then("a1", TOO_LARGE)
    before = timezone.now()

    run_until_idle()

    attempt = delivery.attempts.get()
    assert attempt.outcome == Outcome.PERMANENT_ERROR
    assert attempt.error_kind == TOO_LARGE.kind
    assert attempt.message == TOO_LARGE.message
    assert attempt.started_at >= before


def test_transport_exception_becomes_transient_failure(
    fifo: Destination, transport: Script
) -> None:
    delivery = queue_events(fifo, [("a1", KEY_A, 1)])["a1"]
    transport.error = RuntimeError("connection pool exhausted")

    run_until_idle()

    attempt = delivery.attempts.get()
    assert status_of(delivery) == DeliveryStatus.PENDING
    assert attempt.outcome == Outcome.TRANSIENT_ERROR
    assert attempt.error_kind == "internal_error"
    assert "RuntimeError" in attempt.message


def test_batch_carries_event_body_and_key(fifo: Destination, transport: Script) -> None:
    delivery = queue_events(fifo, [("a1", KEY_A, 1)])["a1"]

    run_until_idle()

    [[message]] = transport.batches
    assert message.body == delivery.event.body()
    assert message.object_key == KEY_A
    assert message.event_type == "ACCEPT"


# Leases.


def test_expired_lease_returns_to_pending(fifo: Destination) -> None:
    delivery = queue_events(fifo, [("a1", KEY_A, 1)])["a1"]
    engine.claim("host-1:4242", limit=10)
    Delivery.objects.filter(pk=delivery.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )

    released = engine.release_expired_leases()

    delivery.refresh_from_db()
    attempt = delivery.attempts.get()
    assert released == 1
    assert delivery.status == DeliveryStatus.PENDING
    assert delivery.claimed_by == ""
    assert delivery.lease_expires_at is None
    assert delivery.next_attempt_at is not None
    assert delivery.next_attempt_at <= timezone.now()
    assert attempt.outcome == Outcome.TRANSIENT_ERROR
    assert attempt.error_kind == "lease_expired"
    assert "host-1:4242" in attempt.message


def test_live_lease_is_kept(fifo: Destination) -> None:
    delivery = queue_events(fifo, [("a1", KEY_A, 1)])["a1"]
    engine.claim("worker-1", limit=10)

    released = engine.release_expired_leases()

    assert released == 0
    assert status_of(delivery) == DeliveryStatus.SENDING


def test_lease_guard_keeps_new_owner(fifo: Destination) -> None:
    delivery = queue_events(fifo, [("a1", KEY_A, 1)])["a1"]
    [stale] = engine.claim("worker-a", limit=10)
    Delivery.objects.filter(pk=delivery.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    engine.release_expired_leases()
    engine.claim("worker-b", limit=10)

    engine.record("worker-a", fifo, [stale], [Sent("late")], timezone.now(), 5)

    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.SENDING
    assert delivery.claimed_by == "worker-b"


def test_lease_owner_records_after_stale_worker(fifo: Destination) -> None:
    delivery = queue_events(fifo, [("a1", KEY_A, 1)])["a1"]
    [stale] = engine.claim("worker-a", limit=10)
    Delivery.objects.filter(pk=delivery.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    engine.release_expired_leases()
    [current] = engine.claim("worker-b", limit=10)
    engine.record("worker-a", fifo, [stale], [Sent("late")], timezone.now(), 5)

    engine.record("worker-b", fifo, [current], [Sent("owner")], timezone.now(), 5)

    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.DELIVERED
    assert delivery.claimed_by == ""


def test_calls_past_half_lease_are_released(
    fifo: Destination, standard: Destination, transport: Script, settings: Any
) -> None:
    settings.DELIVERY_LEASE_SECONDS = 2
    # The first destination's call takes more than half of the lease.
    transport.delay_seconds = 1.2
    queue_events(fifo, [("a1", KEY_A, 1)])
    deliveries = queue_events(standard, [("u1", KEY_B, 2)])

    claimed = engine.run_once("worker-1")
    after_first_round = list(transport.sent)
    deliveries["u1"].refresh_from_db()
    attempts_after_first_round = deliveries["u1"].attempts.count()
    transport.delay_seconds = 0
    engine.run_once("worker-1")

    assert claimed == 2
    assert after_first_round == ["a1"]
    assert deliveries["u1"].status == DeliveryStatus.PENDING
    assert deliveries["u1"].claimed_by == ""
    assert attempts_after_first_round == 0
    assert transport.sent == ["a1", "u1"]


# Claims from two threads at once.

CLAIM_POOL = 200
CLAIM_KEYS = 5
# More than half the keys, so the threads compete for the same heads.
CLAIM_LIMIT = 4
MAX_EMPTY_CLAIMS = 20_000
# The session's Celery worker, once started, shares the test database and claims
# whatever is due. Deliveries due only on a clock a day ahead keep it out.
CLOCK_SHIFT = timedelta(days=1)


@dataclass
class ClaimLog:
    """What two claiming threads saw, checked under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    claimed: set[int] = field(default_factory=set)
    repeats: list[str] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    in_flight: set[str] = field(default_factory=set)
    order: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    finished: int = 0
    errors: list[str] = field(default_factory=list)

    def start(self, worker: str, deliveries: list[Delivery]) -> None:
        with self.lock:
            # A claim may take a run of one key; it overlaps only with keys that
            # earlier claims still have in flight.
            in_flight_before = set(self.in_flight)
            for delivery in deliveries:
                if delivery.pk in self.claimed:
                    self.repeats.append(f"{worker} claimed {delivery.event_id} again")
                if delivery.ordering_key in in_flight_before:
                    self.overlaps.append(
                        f"{worker} claimed {delivery.event_id} while an earlier "
                        f"delivery of {delivery.ordering_key} was unfinished"
                    )
                self.claimed.add(delivery.pk)
                self.in_flight.add(delivery.ordering_key)
                self.order[delivery.ordering_key].append(delivery.event_id)

    def finish(self, deliveries: list[Delivery]) -> None:
        # Called before the result is committed: from then on the next delivery of
        # the key may be claimed, so it must already be out of in_flight.
        with self.lock:
            for delivery in deliveries:
                self.in_flight.discard(delivery.ordering_key)

    def count(self, deliveries: list[Delivery]) -> None:
        with self.lock:
            self.finished += len(deliveries)


def claim_until_done(worker: str, log: ClaimLog) -> None:
    try:
        empty_claims = 0
        while log.finished < CLAIM_POOL and empty_claims < MAX_EMPTY_CLAIMS:
            claimed = engine.claim(worker, CLAIM_LIMIT)
            if not claimed:
                empty_claims += 1
                time.sleep(0.001)
                continue

            empty_claims = 0
            log.start(worker, claimed)
            # Holding the lease a moment gives the other thread time to claim.
            time.sleep(0.002)
            log.finish(claimed)
            results = [Sent(f"remote-{delivery.event_id}") for delivery in claimed]
            destination = claimed[0].destination
            engine.record(worker, destination, claimed, results, timezone.now(), 2)
            log.count(claimed)
    except Exception as error:
        log.errors.append(f"{worker}: {error!r}")
    finally:
        connection.close()


@pytest.mark.django_db(transaction=True)
def test_concurrent_claims_never_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + CLOCK_SHIFT)
    destination = make_destination(make_application())
    keys = [f"4102/st-1/order/{number}" for number in range(CLAIM_KEYS)]
    rng = random.Random(200)
    events = [
        (f"e{number:03d}", rng.choice(keys), number) for number in range(CLAIM_POOL)
    ]
    expected_order = defaultdict(list)
    for event_id, key, _ in events:
        expected_order[key].append(event_id)
    # Rows created in an order unrelated to event time, so claiming by row order
    # alone would break the order per key.
    rng.shuffle(events)
    queue_events(destination, events)
    log = ClaimLog()
    threads = [
        threading.Thread(target=claim_until_done, args=(f"claimer-{n}", log))
        for n in range(2)
    ]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    delivered = Delivery.objects.filter(status=DeliveryStatus.DELIVERED)
    assert log.errors == []
    assert log.repeats == []
    assert log.overlaps == []
    assert len(log.claimed) == CLAIM_POOL
    assert dict(log.order) == dict(expected_order)
    assert delivered.count() == CLAIM_POOL


# Two Celery worker processes sending to a FIFO queue on the SQS peer.

WORKER_EVENTS = 100
WORKER_KEYS = 10
FINISH_SECONDS = 180.0
MAX_RECEIVES = 100
SECOND_WORKER_QUEUE = f"engine-second-{os.getpid()}"


@pytest.fixture
def second_worker(
    worker: Worker,
    sqs_peer: SqsPeer,
    celery_broker: dict[str, str],
    tmp_path: Path,
) -> Iterator[Worker]:
    """A second `celery worker` on the same database, broker and SQS peer as the
    session's worker, claiming 3 deliveries at a time. Besides the default queue it
    consumes SECOND_WORKER_QUEUE, so a test can wake it alone. Only the session's
    worker runs beat."""
    environment = {
        name: value for name, value in os.environ.items() if name not in AWS_VARIABLES
    }
    environment.update(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "ENV_FILE": "",
            "DATABASE_URL": database_url(connection.settings_dict),
            "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
            "SQS_TIMEOUT": "5",
            "DELIVERY_CLAIM_SIZE": "3",
            "LOG_LEVEL": "INFO",
            **celery_broker,
            **peer_environment(sqs_peer.endpoint_url),
        }
    )
    command = [
        str(Path(sys.executable).parent / "celery"),
        "-A",
        "portal",
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "-l",
        "info",
        "-n",
        f"tests-second-{os.getpid()}@127.0.0.1",
        "-Q",
        f"celery,{SECOND_WORKER_QUEUE}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    second = Worker(command, environment, tmp_path / "second-worker.log")
    try:
        second.wait_until_ready(WORKER_START_SECONDS)
        yield second
    finally:
        second.stop()


def order_envelope(number: int) -> str:
    return json.dumps(
        {
            "id": f"evt-{number:03d}",
            "time": (BASE_TIME + timedelta(seconds=number)).isoformat(),
            "type": "ACCEPT",
            "data": {
                "channel_id": "4102",
                "channel_store_id": "st-1",
                "channel_order_id": f"o-{number % WORKER_KEYS}",
            },
        }
    )


def wait_until_finished(destination: Destination, workers: list[Worker]) -> None:
    unfinished = Delivery.objects.filter(
        destination=destination,
        status__in=(DeliveryStatus.PENDING, DeliveryStatus.SENDING),
    )
    deadline = time.monotonic() + FINISH_SECONDS
    while unfinished.exists():
        if time.monotonic() > deadline:
            logs = "\n".join(worker.log()[-20_000:] for worker in workers)
            raise AssertionError(
                f"{unfinished.count()} deliveries unfinished after "
                f"{FINISH_SECONDS:g} s. The workers' logs:\n{logs}"
            )
        time.sleep(0.2)


def wait_until_claimed(destination: Destination, workers: list[Worker]) -> None:
    pending = Delivery.objects.filter(
        destination=destination, status=DeliveryStatus.PENDING
    )
    deadline = time.monotonic() + FINISH_SECONDS
    while pending.count() == WORKER_EVENTS:
        if time.monotonic() > deadline:
            logs = "\n".join(worker.log()[-20_000:] for worker in workers)
            raise AssertionError(
                f"No delivery was claimed after {FINISH_SECONDS:g} s. The workers' "
                f"logs:\n{logs}"
            )
        time.sleep(0.05)


def receive_all(queue: "PeerQueue") -> list[dict[str, Any]]:
    """Receive and delete messages until the queue returns none. A FIFO queue holds
    back a group's later messages while one is received and not deleted."""
    client = sqs_client(queue.endpoint_url)
    received: list[dict[str, Any]] = []
    for _ in range(MAX_RECEIVES):
        messages = queue.receive()
        if not messages:
            break
        received.extend(messages)
        client.delete_message_batch(
            QueueUrl=queue.peer_url,
            Entries=[
                {"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]}
                for index, message in enumerate(messages)
            ],
        )
    return received


@pytest.mark.django_db(transaction=True)
def test_two_workers_deliver_once_in_order(
    worker: Worker,
    second_worker: Worker,
    make_sqs_queue: Callable[..., "PeerQueue"],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue = make_sqs_queue("engine", fifo=True)
    application = make_application()
    destination = make_destination(
        application, name=f"queue {queue.name}", sqs_queue_url=queue.url
    )
    envelopes = [parse_envelope(order_envelope(n)) for n in range(WORKER_EVENTS)]
    key_of = {envelope.id: envelope.object_key for envelope in envelopes}
    expected = defaultdict(list)
    for envelope in envelopes:
        expected[envelope.object_key].append(envelope.id)

    # A worker that claims all heads keeps them: it claims each key's next event as
    # soon as it records the last. So the second worker, which claims only 3, is
    # woken first, and the session's worker, which claims up to 100, once the
    # second one has started.
    monkeypatch.setattr(tasks, "wake_workers", lambda *args: None)
    publish_many(application, Stage.PROD, envelopes)
    tasks.send_due.apply_async(queue=SECOND_WORKER_QUEUE)
    wait_until_claimed(destination, [worker, second_worker])
    tasks.send_due.delay()
    wait_until_finished(destination, [worker, second_worker])
    messages = receive_all(queue)

    copies = Counter(
        message["Attributes"]["MessageDeduplicationId"] for message in messages
    )
    received = defaultdict(list)
    for message in messages:
        event_id = message["MessageAttributes"]["event_id"]["StringValue"]
        received[key_of[event_id]].append(event_id)
    successes = Attempt.objects.filter(
        delivery__destination=destination, outcome=Outcome.SUCCESS
    )
    assert sorted(copies) == sorted(key_of)
    assert set(copies.values()) == {1}
    assert dict(received) == dict(expected)
    assert successes.count() == WORKER_EVENTS
    assert successes.values("delivery").distinct().count() == WORKER_EVENTS
