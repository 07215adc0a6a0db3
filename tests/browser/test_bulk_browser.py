"""A bulk test send in a real browser: select every destination of the list, run
the action, and watch the job's page until each destination's result is in."""

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from playwright.sync_api import Page, expect

from delivery.models import BulkJob
from destinations.models import Application, Destination, Kind, Stage

if TYPE_CHECKING:
    from tests.conftest import PeerQueue, Worker

MakeQueue = Callable[..., "PeerQueue"]

DESTINATION_COUNT = 30
# The job's page reloads itself every 2 seconds; the worker needs a few seconds.
RESULT_DEADLINE_MS = 90_000

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def make_destinations(queue: "PeerQueue", count: int) -> None:
    application = Application.objects.create(name="Orders", slug="orders")
    Destination.objects.bulk_create(
        Destination(
            application=application,
            stage=Stage.TEST,
            kind=Kind.SQS,
            name=f"Orders queue {number:02d}",
            sqs_queue_url=queue.url,
        )
        for number in range(count)
    )


def run_on_all(page: Page, action: str) -> None:
    """Tick the list's select-all box, choose `action` and run it."""
    page.goto("/admin/destinations/destination/")
    page.locator("#action-toggle").check()
    page.locator("select[name=action]").select_option(action)
    page.get_by_role("button", name="Run", exact=True).click()


def test_bulk_test_send_shows_progress_then_results(
    admin_page: Page, worker: "Worker", make_sqs_queue: MakeQueue
) -> None:
    page = admin_page
    queue = make_sqs_queue("bulk-browser")
    make_destinations(queue, DESTINATION_COUNT)

    run_on_all(page, "send_test_events")

    job = BulkJob.objects.get()
    expect(page).to_have_url(f"/admin/delivery/bulkjob/{job.pk}/change/")
    expect(page.locator(".messagelist .success")).to_contain_text(
        f"Send test event: {DESTINATION_COUNT} destinations queued."
    )
    expect(page.locator('td[data-count="total"]')).to_have_text(str(DESTINATION_COUNT))
    expect(page.locator(".bulk-job")).to_have_attribute(
        "data-state", "finished", timeout=RESULT_DEADLINE_MS
    )
    expect(page.locator('td[data-count="delivered"]')).to_have_text(
        str(DESTINATION_COUNT)
    )
    expect(page.locator('td[data-count="waiting"]')).to_have_text("0")
    expect(page.locator('tr[data-status="delivered"]')).to_have_count(DESTINATION_COUNT)
    expect(page.locator('meta[http-equiv="refresh"]')).to_have_count(0)
    first = page.locator("table.bulk-results tbody tr").first
    expect(first).to_contain_text("Orders queue 00")
    expect(first).to_contain_text("Delivered at ")
