"""Bulk actions on many destinations: the request records a job and returns, the
worker does the work in chunks, and the job's page shows progress and results."""

import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from delivery import bulk
from delivery.models import (
    Attempt,
    BulkJob,
    BulkJobItem,
    BulkJobKind,
    Delivery,
    DeliveryStatus,
    Event,
    Outcome,
)
from destinations.models import Application, Destination, Kind, Stage

from .bulk_waits import wait_for_job

if TYPE_CHECKING:
    from .conftest import PeerQueue, Worker

pytestmark = pytest.mark.django_db

DESTINATIONS_URL = reverse("admin:destinations_destination_changelist")
REFRESH = '<meta http-equiv="refresh"'


@pytest.fixture
def application() -> Application:
    return Application.objects.create(name="Shop", slug="shop")


def make_destinations(
    application: Application, count: int, queue_url: str = ""
) -> list[Destination]:
    return Destination.objects.bulk_create(
        Destination(
            application=application,
            stage=Stage.TEST,
            kind=Kind.SQS,
            name=f"Queue {number:03d}",
            sqs_queue_url=queue_url
            or f"https://sqs.eu-west-1.amazonaws.com/123456789012/q{number}",
        )
        for number in range(count)
    )


def run_action(client: Client, action: str, destinations: list[Destination]) -> Any:
    return client.post(
        DESTINATIONS_URL,
        {
            "action": action,
            "_selected_action": [str(destination.pk) for destination in destinations],
        },
    )


def page_url(job: BulkJob) -> str:
    return reverse("admin:delivery_bulkjob_change", args=[job.pk])


def count_on_page(html: str, name: str) -> int:
    found = re.search(rf'<td data-count="{name}">(\d+)</td>', html)
    assert found is not None, f"No {name} count on the page"
    return int(found.group(1))


def finish_test_deliveries(job: BulkJob, outcome: str) -> None:
    """Record what a worker would have for each test delivery of `job`."""
    status = DeliveryStatus.DELIVERED
    if outcome != Outcome.SUCCESS:
        status = DeliveryStatus.FAILED
    for delivery in Delivery.objects.filter(pk__in=job.items.values("delivery")):
        Attempt.objects.create(
            delivery=delivery,
            started_at=delivery.created_at,
            duration_ms=7,
            outcome=outcome,
            error_kind="" if status == DeliveryStatus.DELIVERED else "queue_not_found",
            message="" if status == DeliveryStatus.DELIVERED else "No such queue.",
            remote_message_id=f"remote-{delivery.pk}",
        )
    Delivery.objects.filter(pk__in=job.items.values("delivery")).update(status=status)


# The request.


def action_queries(client: Client, destinations: list[Destination]) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = run_action(client, "send_test_events", destinations)
    assert response.status_code == 302
    return len(queries)


def test_bulk_action_queries_do_not_grow(
    admin_client: Client, application: Application
) -> None:
    few = action_queries(admin_client, make_destinations(application, 5))
    other = Application.objects.create(name="Big", slug="big")

    many = action_queries(admin_client, make_destinations(other, 200))

    assert many == few


def test_bulk_action_only_records_job(
    admin_client: Client,
    application: Application,
    django_capture_on_commit_callbacks: Any,
) -> None:
    destinations = make_destinations(application, 3)

    with django_capture_on_commit_callbacks() as callbacks:
        response = run_action(admin_client, "send_test_events", destinations)

    job = BulkJob.objects.get()
    assert response["Location"] == page_url(job)
    assert job.kind == BulkJobKind.TEST_EVENT
    assert job.total == 3
    assert len(callbacks) == 1
    assert not Event.objects.exists()


# The worker's side, run in this process.


def test_job_sends_one_test_event_each(
    admin_client: Client, application: Application
) -> None:
    destinations = make_destinations(application, 5)
    run_action(admin_client, "send_test_events", destinations)
    job = BulkJob.objects.get()

    bulk.run(job.pk, chunk_size=2)

    job.refresh_from_db()
    assert job.done == 5
    assert job.succeeded == 5
    assert job.finished_at is not None
    assert Delivery.objects.filter(is_test=True).count() == 5
    assert set(job.items.values_list("destination", flat=True)) == {
        destination.pk for destination in destinations
    }


def test_job_resumes_after_interruption(application: Application) -> None:
    destinations = make_destinations(application, 5)
    job = bulk.start(BulkJobKind.TEST_EVENT, [d.pk for d in destinations], None)

    bulk._run_chunk(job.pk, chunk_size=2)
    bulk.run(job.pk, chunk_size=2)
    bulk.run(job.pk, chunk_size=2)

    assert BulkJobItem.objects.filter(job=job).count() == 5
    assert Delivery.objects.count() == 5


def test_sweep_requeues_only_stale_unfinished_jobs(
    application: Application, django_capture_on_commit_callbacks: Any
) -> None:
    destinations = make_destinations(application, 3)
    ids = [d.pk for d in destinations]
    with django_capture_on_commit_callbacks():
        stale = bulk.start(BulkJobKind.RETRY_FAILED, ids, None)
        fresh = bulk.start(BulkJobKind.RETRY_FAILED, ids, None)
    an_hour_ago = timezone.now() - timedelta(hours=1)
    BulkJob.objects.filter(pk=stale.pk).update(created_at=an_hour_ago)
    queued: list[int] = []

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bulk, "_queue", queued.append)
        assert bulk.requeue_unfinished() == 1
        bulk.run(stale.pk)
        assert bulk.requeue_unfinished() == 0

    assert queued == [stale.pk]
    assert fresh.pk not in queued
    stale.refresh_from_db()
    assert stale.finished_at is not None


def test_job_reports_deleted_destination(application: Application) -> None:
    kept, deleted = make_destinations(application, 2)
    job = bulk.start(BulkJobKind.TEST_EVENT, [kept.pk, deleted.pk], None)
    deleted_pk = deleted.pk
    deleted.delete()

    bulk.run(job.pk)

    job.refresh_from_db()
    assert job.succeeded == 1
    assert job.failed == 1
    missing = job.items.get(destination__isnull=True)
    assert missing.destination_name == f"Destination {deleted_pk}"


def test_retry_job_counts_per_destination(
    admin_client: Client, application: Application
) -> None:
    first, second = make_destinations(application, 2)
    for number in range(3):
        event = Event.objects.create(
            id=f"e{number}",
            application=application,
            stage=Stage.TEST,
            type="ORDER_CREATED",
            object_key="4102/order/1",
            time="2025-03-03T08:00:00Z",
            data={},
        )
        Delivery.objects.create(
            event=event, destination=first, status=DeliveryStatus.FAILED
        )
    response = run_action(admin_client, "retry_failed_deliveries", [first, second])
    job = BulkJob.objects.get()

    bulk.run(job.pk)
    page = admin_client.get(response["Location"])

    assert Delivery.objects.filter(status=DeliveryStatus.PENDING).count() == 3
    assert count_on_page(page.text, "requeued") == 3
    assert "Queued 3 failed deliveries again." in page.text
    assert "No failed deliveries." in page.text


# The job's page.


def test_progress_page_refreshes_while_running(
    admin_client: Client, application: Application
) -> None:
    response = run_action(
        admin_client, "send_test_events", make_destinations(application, 2)
    )

    page = admin_client.get(response["Location"])

    assert REFRESH in page.text
    assert "the worker has not started yet" in page.text
    assert count_on_page(page.text, "done") == 0


def test_progress_page_waits_for_test_deliveries(
    admin_client: Client, application: Application
) -> None:
    response = run_action(
        admin_client, "send_test_events", make_destinations(application, 2)
    )
    bulk.run(BulkJob.objects.get().pk)

    page = admin_client.get(response["Location"])

    assert REFRESH in page.text
    assert count_on_page(page.text, "waiting") == 2


def test_finished_page_lists_results_without_refresh(
    admin_client: Client, application: Application
) -> None:
    response = run_action(
        admin_client, "send_test_events", make_destinations(application, 2)
    )
    job = BulkJob.objects.get()
    bulk.run(job.pk)
    finish_test_deliveries(job, Outcome.PERMANENT_ERROR)

    page = admin_client.get(response["Location"])

    assert REFRESH not in page.text
    assert count_on_page(page.text, "failed") == 2
    assert page.text.count('<tr data-status="failed">') == 2
    assert "Permanent error (queue_not_found): No such queue." in page.text


def test_progress_page_needs_view_right(
    admin_client: Client, application: Application, django_user_model: type[User]
) -> None:
    response = run_action(
        admin_client, "send_test_events", make_destinations(application, 1)
    )
    other = django_user_model.objects.create_user(
        username="other", password="unused-password-1", is_staff=True
    )
    other.user_permissions.set(Permission.objects.filter(codename="view_destination"))
    client = Client()
    client.force_login(other)

    page = client.get(response["Location"])

    assert page.status_code == 403


def test_job_creator_may_follow_own_job(
    application: Application, django_user_model: type[User]
) -> None:
    user = django_user_model.objects.create_user(
        username="operator", password="unused-password-1", is_staff=True
    )
    codenames = ["view_destination", "change_destination"]
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)

    response = run_action(client, "send_test_events", make_destinations(application, 1))
    page = client.get(response["Location"])

    assert page.status_code == 200
    assert count_on_page(page.text, "total") == 1


# Through the real worker.


@pytest.mark.django_db(transaction=True)
def test_worker_sends_bulk_test_to_150_destinations(
    worker: "Worker",
    make_sqs_queue: "Any",
    admin_client: Client,
    application: Application,
) -> None:
    queues: list[PeerQueue] = [make_sqs_queue("bulk") for _ in range(3)]
    destinations = [
        destination
        for queue in queues
        for destination in make_destinations(application, 50, queue.url)
    ]

    with CaptureQueriesContext(connection) as queries:
        response = run_action(admin_client, "send_test_events", destinations)
    job = BulkJob.objects.get()
    progress = wait_for_job(worker, job.pk)
    page = admin_client.get(response["Location"])

    assert response.status_code == 302
    assert len(queries) <= 15
    assert progress.delivered == 150
    assert count_on_page(page.text, "delivered") == 150
    assert page.text.count('<tr data-status="delivered">') == 150
    assert REFRESH not in page.text


@pytest.mark.parametrize(
    ("total", "text"),
    [(1, "Send test event on 1 destination"), (3, "Send test event on 3 destinations")],
)
def test_job_name_counts_destinations(total: int, text: str) -> None:
    job = BulkJob(kind=BulkJobKind.TEST_EVENT, total=total)

    assert str(job) == text
