"""The staff admin in a real browser: log in, add an application and a destination,
send a test event through the Celery worker and see its result on the page."""

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from playwright.sync_api import Locator, Page, expect

from delivery.models import Delivery
from delivery.peers.sqs import DEFAULT_REGION
from delivery.testevents import TEST_EVENT_TYPE
from destinations.models import Application, Destination, Kind, Stage

if TYPE_CHECKING:
    from tests.conftest import PeerQueue, Worker

MakeQueue = Callable[..., "PeerQueue"]

# How long the tests reload a page while waiting for the worker's result.
RESULT_DEADLINE_SECONDS = 60.0
RELOAD_INTERVAL_SECONDS = 0.5

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


# Steps a member of staff takes, one function each.


def add_application(page: Page, name: str, slug: str) -> None:
    page.goto("/admin/destinations/application/add/")
    page.get_by_label("Name").fill(name)
    # The admin's script copies the name into the slug when the name field loses
    # focus. Leave it first, because when that happened during fill() the slug
    # came out doubled ("ordersorders").
    page.get_by_label("Name").press("Tab")
    page.get_by_label("Slug").fill(slug)
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.locator(".messagelist .success")).to_contain_text(name)


def fill_sqs_form(page: Page, queue_url: str, fifo: bool) -> None:
    page.get_by_label("Queue URL").fill(queue_url)
    fifo_box = page.get_by_label("FIFO queue")
    if fifo:
        fifo_box.check()
    else:
        fifo_box.uncheck()


# The kind-specific part of the add form, keyed by kind. Each function takes the
# page and the keyword arguments that `add_destination` gets as `settings`.
KIND_FORMS: dict[Kind, Callable[..., None]] = {
    Kind.SQS: fill_sqs_form,
}


def add_destination(
    page: Page,
    kind: Kind,
    *,
    name: str,
    application: str,
    stage: Stage,
    **settings: Any,
) -> None:
    """Open Destinations > Add, choose `kind`, fill the form, press Save and
    continue editing, and wait for the next page: the change page with a success
    message, or the add form with its errors. `settings` go to the kind's
    form-filling function."""
    page.goto("/admin/destinations/destination/")
    page.get_by_role("link", name="Add destination").click()
    page.get_by_role("link", name=kind.label, exact=True).click()

    page.get_by_label("Application").select_option(label=application)
    page.get_by_label("Stage").select_option(stage.value)
    page.locator("#id_name").fill(name)
    KIND_FORMS[kind](page, **settings)
    page.get_by_role("button", name="Save and continue editing").click()
    # The add form shows neither, so whichever appears belongs to the next page.
    page.locator(".messagelist, .errornote").first.wait_for()


def reload_until(page: Page, done: Callable[[], bool], waiting_for: str) -> None:
    """Reload `page` until `done()` returns true, and fail after
    RESULT_DEADLINE_SECONDS.

    The result pages do not refresh themselves, so staff reload them, as this does.
    """
    deadline = time.monotonic() + RESULT_DEADLINE_SECONDS
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(
                f"{page.url} did not show {waiting_for} within "
                f"{RESULT_DEADLINE_SECONDS:g} s of reloading."
            )
        time.sleep(RELOAD_INTERVAL_SECONDS)
        page.reload()


def latest_result(page: Page, status: str) -> Locator:
    return page.locator(f'.test-result[data-status="{status}"]')


def latest_result_shown(page: Page) -> bool:
    """Return whether the latest test event has a result. Fail at once on an error
    result, because reloading will not change it."""
    error = latest_result(page, "error")
    if error.count():
        pytest.fail(f"The test event failed: {error.inner_text()}")
    return latest_result(page, "success").count() > 0


def destination_row(page: Page, name: str) -> Locator:
    return page.locator("#result_list tbody tr", has_text=name)


# The tests.


def test_sqs_destination_sends_test_event(
    admin_page: Page, worker: "Worker", make_sqs_queue: MakeQueue
) -> None:
    page = admin_page
    queue = make_sqs_queue("browser", fifo=True)
    add_application(page, "Orders", "orders")

    add_destination(
        page,
        Kind.SQS,
        name="Orders queue",
        application="Orders",
        stage=Stage.TEST,
        queue_url=queue.url,
        fifo=True,
    )

    destination = Destination.objects.get(name="Orders queue")
    assert destination.application.slug == "orders"
    assert page.get_by_label("Region").input_value() == DEFAULT_REGION
    assert page.get_by_label("Queue URL").input_value() == queue.url
    assert page.get_by_label("FIFO queue").is_checked()

    page.locator("#send-test-event").click()

    # The change page already shows the "added" message, so wait for this one.
    expect(page.locator(".messagelist .success")).to_contain_text(
        "Test event queued for Orders queue"
    )
    reload_until(page, lambda: latest_result_shown(page), "the test event's result")
    result_text = latest_result(page, "success").inner_text()
    messages = queue.receive()
    assert len(messages) == 1
    message = messages[0]
    assert f"message ID {message['MessageId']}" in result_text
    assert json.loads(message["Body"])["type"] == TEST_EVENT_TYPE
    event = Delivery.objects.get(destination=destination, event__is_test=True).event
    assert message["Attributes"]["MessageGroupId"] == event.object_key


def test_invalid_queue_url_is_rejected(
    admin_page: Page, make_sqs_queue: MakeQueue
) -> None:
    page = admin_page
    Application.objects.create(name="Orders", slug="orders")
    queue = make_sqs_queue("browser", fifo=True)
    # A common slip: the URL without its account ID.
    invalid_url = f"https://sqs.{DEFAULT_REGION}.amazonaws.com/{queue.name}"

    add_destination(
        page,
        Kind.SQS,
        name="Orders queue",
        application="Orders",
        stage=Stage.TEST,
        queue_url=invalid_url,
        fifo=True,
    )

    error = page.locator(".field-sqs_queue_url .errorlist").inner_text()
    assert invalid_url in error
    assert "is not an SQS queue URL" in error
    assert page.locator(".errornote").is_visible()
    assert page.get_by_label("Queue URL").input_value() == invalid_url
    assert not Destination.objects.exists()


def test_list_action_sends_test_event(
    admin_page: Page, worker: "Worker", make_sqs_queue: MakeQueue
) -> None:
    page = admin_page
    Application.objects.create(name="Orders", slug="orders")
    queue = make_sqs_queue("browser", fifo=True)
    add_destination(
        page,
        Kind.SQS,
        name="Orders queue",
        application="Orders",
        stage=Stage.TEST,
        queue_url=queue.url,
        fifo=True,
    )
    page.goto("/admin/destinations/destination/")
    row = destination_row(page, "Orders queue")
    assert row.locator("td.field-target").inner_text() == queue.url
    assert row.locator("td.field-last_test_result").inner_text() == "-"

    row.locator("input.action-select").check()
    page.locator("select[name=action]").select_option("send_test_events")
    # Django 6 labels the actions' submit button "Run", where earlier versions
    # used "Go".
    page.get_by_role("button", name="Run", exact=True).click()

    expect(page.locator(".messagelist .success")).to_contain_text(
        "Send test event: 1 destination queued."
    )
    # The job's page reloads itself until the test delivery has its outcome.
    expect(page.locator(".bulk-job")).to_have_attribute(
        "data-state", "finished", timeout=RESULT_DEADLINE_SECONDS * 1000
    )
    page.goto("/admin/destinations/destination/")
    last_test = destination_row(page, "Orders queue").locator(
        "td.field-last_test_result"
    )
    reload_until(
        page,
        lambda: last_test.inner_text() != "Queued",
        "the 'last test' result",
    )
    assert last_test.inner_text().startswith("Delivered ")
    assert len(queue.receive()) == 1
