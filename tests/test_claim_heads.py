"""Claims on PostgreSQL that look for heads beyond the window of the oldest due
deliveries, compared with claimable()."""

import pytest
from django.utils import timezone

from delivery import claiming, engine
from delivery.claiming import claimable
from delivery.models import Delivery, DeliveryStatus
from destinations.models import Application, Destination

from .delivery_doubles import (
    STANDARD_QUEUE_URL,
    add_event,
    make_application,
    make_destination,
    queue_delivery,
    queue_events,
)

pytestmark = pytest.mark.django_db

KEY_A = "4102/st-1/order/a"
KEY_B = "4102/st-1/order/b"


@pytest.fixture
def application() -> Application:
    return make_application()


@pytest.fixture
def paused_standard(application: Application) -> Destination:
    return make_destination(
        application,
        ordered=False,
        name="Paused",
        sqs_queue_url=STANDARD_QUEUE_URL.replace("orders", "paused"),
        paused_at=timezone.now(),
    )


@pytest.fixture
def fifo(application: Application) -> Destination:
    return make_destination(application, ordered=True)


def queue_backlog_and_test_event(destination: Destination) -> None:
    """Queue five events to a paused destination, then a test event, the newest."""
    queue_events(destination, [(f"p{n}", KEY_A, n) for n in range(1, 6)])
    test_event = add_event(destination.application, "t1", "", timezone.now())
    queue_delivery(destination, test_event, is_test=True)


@pytest.mark.parametrize("limit", [1, 2])
def test_test_event_passes_paused_backlog(
    paused_standard: Destination, limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The paused destination's backlog fills the window, so the claim walks keys.
    monkeypatch.setattr(claiming, "DUE_SCAN_WINDOW", 2)
    queue_backlog_and_test_event(paused_standard)

    expected = list(claimable(timezone.now()).values_list("event_id", flat=True))
    claimed = engine.claim("worker-1", limit=limit)

    assert expected == ["t1"]
    assert [delivery.event_id for delivery in claimed] == ["t1"]


def test_due_work_sees_paused_test_event(
    paused_standard: Destination, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(claiming, "DUE_SCAN_WINDOW", 2)
    queue_backlog_and_test_event(paused_standard)

    assert engine.has_due_work() is True


def queue_replay_in_flight_and_head_behind(fifo: Destination) -> None:
    """Queue a replayed older event of key A that waits while the newer one is
    being sent, then key B's head."""
    deliveries = queue_events(fifo, [("a1", KEY_A, 1), ("a2", KEY_A, 2)])
    Delivery.objects.filter(pk=deliveries["a2"].pk).update(
        status=DeliveryStatus.SENDING, claimed_by="other"
    )
    queue_events(fifo, [("b1", KEY_B, 3)])


def test_waiting_replay_hides_no_head(
    fifo: Destination, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The window contains only a1, first in its key's line but waiting for a2.
    monkeypatch.setattr(claiming, "DUE_SCAN_WINDOW", 1)
    queue_replay_in_flight_and_head_behind(fifo)

    expected = list(claimable(timezone.now()).values_list("event_id", flat=True))
    claimed = engine.claim("worker-1", limit=4)

    assert expected == ["b1"]
    assert [delivery.event_id for delivery in claimed] == ["b1"]


def test_due_work_sees_head_past_replay(
    fifo: Destination, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(claiming, "DUE_SCAN_WINDOW", 1)
    queue_replay_in_flight_and_head_behind(fifo)

    assert engine.has_due_work() is True
