"""Staff switching a destination's ordering on or off while deliveries wait: the
unfinished deliveries follow the new setting, driven through a recording transport."""

import pytest

from delivery import health
from delivery.models import Delivery, DeliveryStatus
from delivery.testevents import send_test_events
from destinations.models import Application, Destination

from .delivery_doubles import (
    FIFO_QUEUE_URL,
    STANDARD_QUEUE_URL,
    THROTTLED,
    Script,
    install_transport,
    make_application,
    make_destination,
    make_due,
    queue_events,
    run_until_idle,
)

pytestmark = pytest.mark.django_db

KEY_A = "4102/st-1/order/a"
KEY_B = "4102/st-1/order/b"


@pytest.fixture
def transport(monkeypatch: pytest.MonkeyPatch) -> Script:
    return install_transport(monkeypatch)


@pytest.fixture
def application() -> Application:
    return make_application()


def hold(deliveries: dict[str, Delivery]) -> None:
    pks = [delivery.pk for delivery in deliveries.values()]
    Delivery.objects.filter(pk__in=pks).update(status=DeliveryStatus.HELD)


def make_ordered(destination: Destination) -> None:
    """Turn ordering on as staff do in the admin: load, edit, save."""
    loaded = Destination.objects.get(pk=destination.pk)
    loaded.sqs_queue_url = FIFO_QUEUE_URL
    loaded.sqs_fifo = True
    loaded.save()


def make_unordered(destination: Destination) -> None:
    loaded = Destination.objects.get(pk=destination.pk)
    loaded.sqs_queue_url = STANDARD_QUEUE_URL
    loaded.sqs_fifo = False
    loaded.save()


def keys_of(deliveries: dict[str, Delivery]) -> dict[str, str]:
    rows = Delivery.objects.filter(pk__in=[d.pk for d in deliveries.values()])
    return {row.event_id: row.ordering_key for row in rows}


def test_ordering_on_keys_held_deliveries(application: Application) -> None:
    destination = make_destination(application, ordered=False)
    deliveries = queue_events(destination, [("a1", KEY_A, 1), ("b1", KEY_B, 2)])
    hold(deliveries)

    make_ordered(destination)

    assert keys_of(deliveries) == {"a1": KEY_A, "b1": KEY_B}


def test_enabled_after_ordering_on_sends_in_order(
    application: Application, transport: Script
) -> None:
    destination = make_destination(application, ordered=False)
    deliveries = queue_events(
        destination, [("a1", KEY_A, 1), ("a2", KEY_A, 2), ("a3", KEY_A, 3)]
    )
    hold(deliveries)
    transport.then("a1", THROTTLED)

    make_ordered(destination)
    health.enable(destination)
    run_until_idle()
    make_due()
    run_until_idle()

    assert transport.sent == ["a1", "a1", "a2", "a3"]


def test_ordering_off_clears_unfinished_keys(application: Application) -> None:
    destination = make_destination(application, ordered=True)
    deliveries = queue_events(destination, [("a1", KEY_A, 1), ("a2", KEY_A, 2)])
    hold({"a1": deliveries["a1"]})

    make_unordered(destination)

    assert keys_of(deliveries) == {"a1": "", "a2": ""}


def test_ordering_switch_leaves_finished_deliveries(
    application: Application,
) -> None:
    destination = make_destination(application, ordered=True)
    deliveries = queue_events(destination, [("a1", KEY_A, 1)])
    Delivery.objects.filter(pk=deliveries["a1"].pk).update(
        status=DeliveryStatus.DELIVERED
    )

    make_unordered(destination)

    assert keys_of(deliveries) == {"a1": KEY_A}


def test_ordering_on_leaves_test_deliveries_unkeyed(
    application: Application,
) -> None:
    destination = make_destination(application, ordered=False)
    test_delivery = send_test_events([destination], None)[0]

    make_ordered(destination)

    test_delivery.refresh_from_db()
    assert test_delivery.ordering_key == ""


def test_save_without_switch_keeps_keys(application: Application) -> None:
    destination = make_destination(application, ordered=False)
    deliveries = queue_events(destination, [("a1", KEY_A, 1)])
    # A key that no switch gave: a save that leaves ordering alone must not touch it.
    Delivery.objects.filter(pk=deliveries["a1"].pk).update(ordering_key=KEY_A)
    loaded = Destination.objects.get(pk=destination.pk)
    loaded.name = "Orders renamed"

    loaded.save()

    assert keys_of(deliveries) == {"a1": KEY_A}
