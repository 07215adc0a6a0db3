"""Claims on PostgreSQL that look for heads beyond the window of the oldest due
deliveries, compared with claimable()."""

import pytest
from django.utils import timezone

from delivery import claiming, engine
from delivery.claiming import claimable
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
