"""The app developers' status pages in a real browser: sign in, read the overview,
the destination page's chart drawn from delivered events, search events, retry a
failed delivery and replay a time range through the Celery worker."""

import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone
from playwright.sync_api import Page, expect

from delivery.ids import new_ulid
from delivery.models import Attempt, Delivery, DeliveryStatus, Event, Outcome
from delivery.publishing import publish
from destinations.models import Application, Destination, Kind, Stage

from .conftest import ARTIFACTS_DIR

if TYPE_CHECKING:
    from tests.conftest import PeerQueue, Worker

MakeQueue = Callable[..., "PeerQueue"]

DEVELOPER_USERNAME = "developer"
DEVELOPER_PASSWORD = "status-browser-password-5"
RESULT_DEADLINE_SECONDS = 60.0
RELOAD_INTERVAL_SECONDS = 0.5
# Events a destination page's chart is drawn from, in the chart test.
DELIVERED_EVENTS = 5
# The smallest MaximumMessageSize SQS accepts; the large event exceeds it.
SMALL_QUEUE_BYTES = 1024

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


# Rows and steps.


@pytest.fixture
def shop() -> Application:
    return Application.objects.create(name="Shop", slug="shop")


@pytest.fixture
def developer_page(
    page: Page, shop: Application, django_user_model: type[User]
) -> Page:
    """`page`, signed in to the status pages as an app developer of "Shop"."""
    user = django_user_model.objects.create_user(
        username=DEVELOPER_USERNAME,
        email="developer@shop.example",
        password=DEVELOPER_PASSWORD,
    )
    shop.developers.add(user)
    page.goto("/status/")
    page.wait_for_url("**/accounts/login/?next=/status/")
    page.get_by_label("Username").fill(DEVELOPER_USERNAME)
    page.get_by_label("Password").fill(DEVELOPER_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/status/")
    return page


def sqs_destination(
    application: Application, queue_url: str, name: str, *, fifo: bool = False
) -> Destination:
    return Destination.objects.create(
        application=application,
        stage=Stage.TEST,
        kind=Kind.SQS,
        name=name,
        sqs_queue_url=queue_url,
        sqs_fifo=fifo,
    )


def envelope(number: int, at: datetime, **data: Any) -> dict[str, Any]:
    return {
        "id": new_ulid(int(at.timestamp() * 1000)),
        "time": at.isoformat().replace("+00:00", "Z"),
        "type": "ACCEPT",
        "data": {
            "channel_id": "4102",
            "channel_store_id": "st-80233",
            "channel_order_id": f"FKO-{number:04d}",
            **data,
        },
    }


def recorded_event(
    application: Application, destination: Destination, at: datetime, key: str
) -> Event:
    """An event delivered long ago, recorded without sending it."""
    event = Event.objects.create(
        id=new_ulid(int(at.timestamp() * 1000)),
        application=application,
        stage=Stage.TEST,
        type="ACCEPT",
        object_key=key,
        time=at,
        data={"channel_order_id": key},
    )
    Delivery.objects.create(
        event=event,
        destination=destination,
        status=DeliveryStatus.DELIVERED,
        ordering_key=key if destination.is_ordered else "",
        event_time=at,
        attempt_count=1,
    )
    return event


def reload_until(page: Page, done: Callable[[], bool], waiting_for: str) -> None:
    """Reload `page` until `done()` returns true, as a person waiting would."""
    deadline = time.monotonic() + RESULT_DEADLINE_SECONDS
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(
                f"{page.url} did not show {waiting_for} within "
                f"{RESULT_DEADLINE_SECONDS:g} s of reloading."
            )
        time.sleep(RELOAD_INTERVAL_SECONDS)
        page.reload()


def received_bodies(queue: "PeerQueue", expected: int) -> list[dict[str, Any]]:
    """Read messages from the queue until `expected` have arrived."""
    bodies: list[dict[str, Any]] = []
    deadline = time.monotonic() + RESULT_DEADLINE_SECONDS
    while len(bodies) < expected and time.monotonic() < deadline:
        bodies += [json.loads(message["Body"]) for message in queue.receive()]
    return bodies


# The tests.


def test_overview_shows_each_destination_state(
    developer_page: Page, shop: Application
) -> None:
    page = developer_page
    url = "https://sqs.eu-west-1.amazonaws.com/123456789012/"
    healthy = sqs_destination(shop, url + "orders", "Orders queue")
    paused = sqs_destination(shop, url + "legacy", "Legacy queue")
    Destination.objects.filter(pk=paused.pk).update(
        paused_at=timezone.now(), pause_reason="SQS denied access to the queue."
    )
    event = recorded_event(shop, healthy, timezone.now(), "FKO-1")
    Attempt.objects.create(
        delivery=event.deliveries.get(),
        started_at=timezone.now(),
        duration_ms=30,
        outcome=Outcome.SUCCESS,
    )
    Delivery.objects.create(event=event, destination=paused, status=DeliveryStatus.HELD)

    page.goto("/status/")
    page.get_by_role("link", name="2 destinations of Shop TEST").click()

    table = page.get_by_role("table", name="Destinations of Shop in TEST")
    healthy_row = table.get_by_role("row").filter(has_text="Orders queue")
    paused_row = table.get_by_role("row").filter(has_text="Legacy queue")
    expect(healthy_row.locator("td.state")).to_contain_text("Healthy")
    expect(healthy_row.locator("td.rate")).to_contain_text("100.0 %")
    expect(paused_row.locator("td.state")).to_contain_text("Paused")
    expect(paused_row.locator("td.state")).to_contain_text("SQS denied access")
    expect(paused_row.locator("td.held")).to_have_text("1")
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to main content")).to_be_focused()


def test_destination_chart_counts_delivered_events(
    developer_page: Page,
    shop: Application,
    worker: "Worker",
    make_sqs_queue: MakeQueue,
) -> None:
    page = developer_page
    queue = make_sqs_queue("status", max_size=SMALL_QUEUE_BYTES)
    destination = sqs_destination(shop, queue.url, "Orders queue")
    now = timezone.now()
    envelopes = [envelope(number, now) for number in range(DELIVERED_EVENTS)]
    envelopes.append(envelope(99, now, note="x" * (2 * SMALL_QUEUE_BYTES)))
    with transaction.atomic():
        for item in envelopes:
            publish(shop, Stage.TEST, item)
    for delivery in Delivery.objects.filter(destination=destination):
        worker.wait_for_delivery(delivery.pk)
    attempts = Attempt.objects.filter(delivery__destination=destination)
    delivered = attempts.filter(outcome=Outcome.SUCCESS).count()
    failed = attempts.exclude(outcome=Outcome.SUCCESS).count()

    page.goto(f"/status/shop/TEST/destinations/{destination.pk}/")

    chart = page.locator("#hourly-chart")
    expect(chart.locator("canvas")).to_have_count(1)
    expect(chart).to_have_attribute("data-chart-drawn", "true")
    table = page.locator("#hourly-table")
    assert delivered == DELIVERED_EVENTS
    assert failed == 1
    assert table.locator("td.delivered-total").text_content() == str(delivered)
    assert table.locator("td.failed-total").text_content() == str(failed)
    failures = page.locator("#failures-table")
    expect(failures).to_contain_text("too_large")
    expect(failures).to_contain_text("Raise the queue's MaximumMessageSize")
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS_DIR / "status-destination.png", full_page=True)


def test_event_search_opens_event_page(developer_page: Page, shop: Application) -> None:
    page = developer_page
    url = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo"
    destination = sqs_destination(shop, url, "Orders queue", fifo=True)
    now = timezone.now()
    first = recorded_event(shop, destination, now - timedelta(minutes=2), "FKO-7")
    Delivery.objects.filter(event=first).update(status=DeliveryStatus.PENDING)
    second = recorded_event(shop, destination, now - timedelta(minutes=1), "FKO-7")
    Delivery.objects.filter(event=second).update(status=DeliveryStatus.PENDING)
    recorded_event(shop, destination, now, "FKO-8")
    page.goto("/status/shop/TEST/events/")

    page.get_by_label("Object key").fill("FKO-7")
    page.get_by_role("button", name="Search").click()

    rows = page.locator("#events-table tbody tr")
    expect(rows).to_have_count(2)
    page.get_by_role("link", name=second.pk).click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(second.pk)
    expect(page.locator(".payload")).to_contain_text('"channel_order_id": "FKO-7"')
    expect(page.locator(".delivery-status")).to_contain_text(
        "Waiting for an earlier event of the same object"
    )
    expect(page.locator(".delivery-status")).to_contain_text(first.pk)


def test_retry_delivers_failed_delivery(
    developer_page: Page,
    shop: Application,
    worker: "Worker",
    make_sqs_queue: MakeQueue,
) -> None:
    page = developer_page
    queue = make_sqs_queue("status")
    destination = sqs_destination(shop, queue.url, "Orders queue")
    event = recorded_event(shop, destination, timezone.now(), "FKO-3")
    delivery = event.deliveries.get()
    Delivery.objects.filter(pk=delivery.pk).update(status=DeliveryStatus.FAILED)
    Attempt.objects.create(
        delivery=delivery,
        started_at=timezone.now(),
        duration_ms=10_000,
        outcome=Outcome.TRANSIENT_ERROR,
        error_kind="timeout",
        message="Sending timed out; the retry window has passed.",
    )
    page.goto(f"/status/shop/TEST/events/{event.pk}/")

    page.get_by_role("button", name="Retry the delivery to Orders queue").click()

    expect(page.get_by_role("status")).to_contain_text("is queued again")
    status = page.locator(".delivery-status")
    reload_until(
        page,
        lambda: status.get_attribute("data-status") == "delivered",
        "the retried delivery as delivered",
    )
    expect(page.locator("table.attempts tbody tr")).to_have_count(2)
    assert [body["id"] for body in received_bodies(queue, 1)] == [event.pk]


def test_replay_confirms_count_and_shows_progress(
    developer_page: Page,
    shop: Application,
    worker: "Worker",
    make_sqs_queue: MakeQueue,
) -> None:
    page = developer_page
    queue = make_sqs_queue("status", fifo=True)
    destination = sqs_destination(shop, queue.url, "Orders queue", fifo=True)
    start = timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=30)
    events = [
        recorded_event(shop, destination, start + timedelta(minutes=m), "FKO-5")
        for m in (1, 2, 3)
    ]
    recorded_event(shop, destination, start - timedelta(minutes=5), "FKO-5")
    page.goto(f"/status/shop/TEST/destinations/{destination.pk}/")
    page.get_by_role("link", name="Replay the events of a time range").click()

    page.get_by_label("From (UTC)").fill(start.strftime("%Y-%m-%dT%H:%M"))
    end = start + timedelta(minutes=10)
    page.get_by_label("Until (UTC)").fill(end.strftime("%Y-%m-%dT%H:%M"))
    page.get_by_role("button", name="Count the events").click()
    expect(page.locator("#replay-summary")).to_contain_text("This sends 3 events")
    page.get_by_role("button", name="Replay 3 events").click()

    expect(page.get_by_role("heading", level=1)).to_have_text("Replay to Orders queue")
    delivered = page.locator('#progress-table td[data-status="delivered"]')
    # The progress page reloads itself while deliveries are on their way.
    expect(delivered).to_have_text("3", timeout=RESULT_DEADLINE_SECONDS * 1000)
    expect(page.locator("#progress-state")).to_contain_text("The replay is finished")
    assert page.locator('meta[http-equiv="refresh"]').count() == 0
    bodies = received_bodies(queue, 3)
    assert [body["id"] for body in bodies] == [event.pk for event in events]
