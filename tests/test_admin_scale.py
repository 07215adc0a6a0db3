"""The staff admin with many destinations and deliveries: a destination list whose
query count does not grow with its rows, lists of deliveries that never count a
whole table, and a CSV export that leaks no secret."""

import csv
import io
import re
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from delivery import pagination
from delivery.models import Attempt, Delivery, DeliveryStatus, Event, Outcome
from delivery.summaries import with_delivery_figures
from destinations.models import Application, Destination, Kind, Stage

pytestmark = pytest.mark.django_db

DESTINATIONS_URL = reverse("admin:destinations_destination_changelist")
DELIVERIES_URL = reverse("admin:delivery_delivery_changelist")
EVENTS_URL = reverse("admin:delivery_event_changelist")
SECRET_KEY_VALUE = "c2VjcmV0LWtleS12YWx1ZS10aGF0LW11c3Qtbm90LWxlYWs="
CONNECTION_STRING = (
    "Endpoint=sb://partner-events.servicebus.windows.net/;"
    f"SharedAccessKeyName=platform-send;SharedAccessKey={SECRET_KEY_VALUE}"
)
DELIVERY_TABLES = ("delivery_delivery", "delivery_event", "delivery_attempt")
QUERY_BUDGET = 15


@pytest.fixture
def application() -> Application:
    return Application.objects.create(name="Shop", slug="shop")


def make_destinations(application: Application, count: int) -> list[Destination]:
    """`count` SQS destinations, each with one event of live traffic delivered and
    one failed an hour ago, and a test event delivered."""
    destinations = Destination.objects.bulk_create(
        Destination(
            application=application,
            stage=Stage.TEST,
            kind=Kind.SQS,
            name=f"Queue {number:03d}",
            sqs_queue_url=(
                f"https://sqs.eu-west-1.amazonaws.com/123456789012/q{number}"
            ),
            last_error="throttled: The queue throttled the request.",
        )
        for number in range(count)
    )
    now = timezone.now()
    for destination in destinations:
        record(destination, "ok", Outcome.SUCCESS, now - timedelta(minutes=5))
        record(destination, "bad", Outcome.TRANSIENT_ERROR, now - timedelta(hours=1))
        record(destination, "test", Outcome.SUCCESS, now, is_test=True)
    return destinations


def record(
    destination: Destination,
    name: str,
    outcome: str,
    started_at: Any,
    is_test: bool = False,
) -> Delivery:
    """An event delivered to `destination` with one attempt of `outcome`."""
    event = Event.objects.create(
        id=f"{name}-{destination.pk}",
        application=destination.application,
        stage=destination.stage,
        type="ORDER_CREATED",
        object_key="4102/order/1",
        time=started_at,
        data={},
        is_test=is_test,
    )
    success = outcome == Outcome.SUCCESS
    delivery = Delivery.objects.create(
        event=event,
        destination=destination,
        is_test=is_test,
        status=DeliveryStatus.DELIVERED if success else DeliveryStatus.FAILED,
    )
    Attempt.objects.create(
        delivery=delivery,
        started_at=started_at,
        duration_ms=9,
        outcome=outcome,
        error_kind="" if success else "throttled",
    )
    return delivery


def query_count(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200
    return len(queries)


def cells(html: str, column: str) -> list[str]:
    pattern = rf'<td class="field-{column}[^"]*">(.*?)</td>'
    return [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(pattern, html)]


# The destination list.


def test_attempt_copies_delivery_columns(application: Application) -> None:
    destination = make_destinations(application, 1)[0]

    attempts = Attempt.objects.filter(delivery__destination=destination)

    assert {attempt.destination_id for attempt in attempts} == {destination.pk}
    assert sorted(attempt.is_test for attempt in attempts) == [False, False, True]


def test_destination_list_queries_do_not_grow(
    admin_client: Client, application: Application
) -> None:
    make_destinations(application, 5)
    few = query_count(admin_client, DESTINATIONS_URL)
    make_destinations(Application.objects.create(name="Big", slug="big"), 45)

    many = query_count(admin_client, DESTINATIONS_URL)

    assert many == few


def test_destination_list_stays_within_budget(
    admin_client: Client,
    application: Application,
    django_assert_max_num_queries: Any,
) -> None:
    make_destinations(application, 50)

    with django_assert_max_num_queries(QUERY_BUDGET):
        response = admin_client.get(DESTINATIONS_URL)

    assert response.status_code == 200
    assert len(cells(response.text, "last_delivery")) == 50


def test_destination_list_shows_delivery_figures(
    admin_client: Client, application: Application
) -> None:
    make_destinations(application, 1)

    response = admin_client.get(DESTINATIONS_URL)

    assert cells(response.text, "last_delivery")[0].startswith("Delivered ")
    assert cells(response.text, "success_rate_24h") == ["50% of 2"]
    error = cells(response.text, "last_error_summary")[0]
    assert error.startswith("throttled: The queue throttled the request. (")


def test_success_rate_ignores_test_and_old_attempts(application: Application) -> None:
    destination = make_destinations(application, 1)[0]
    record(destination, "old", Outcome.SUCCESS, timezone.now() - timedelta(days=2))

    annotated = with_delivery_figures(Destination.objects.all()).get()

    assert annotated.attempts_24h == 2
    assert annotated.successes_24h == 1


def test_destination_without_attempts_shows_dashes(
    admin_client: Client, application: Application
) -> None:
    Destination.objects.create(
        application=application,
        stage=Stage.PROD,
        kind=Kind.SQS,
        name="Quiet",
        sqs_queue_url="https://sqs.eu-west-1.amazonaws.com/123456789012/quiet",
    )

    response = admin_client.get(DESTINATIONS_URL)

    assert cells(response.text, "last_delivery") == ["-"]
    assert cells(response.text, "success_rate_24h") == ["-"]
    assert cells(response.text, "last_error_summary") == ["-"]


# Lists of events and deliveries.


def full_counts(queries: CaptureQueriesContext) -> list[str]:
    """The queries that count every row of a delivery table: a COUNT with no
    WHERE clause and no LIMIT that bounds it."""
    found = []
    for query in queries.captured_queries:
        sql = query["sql"].upper()
        if "COUNT(" not in sql or "WHERE" in sql or "LIMIT" in sql:
            continue
        if any(table.upper() in sql for table in DELIVERY_TABLES):
            found.append(query["sql"])
    return found


@pytest.mark.parametrize(
    "url",
    [
        DELIVERIES_URL,
        f"{DELIVERIES_URL}?status__exact=failed",
        f"{DELIVERIES_URL}?q=4102/order/1",
        EVENTS_URL,
        f"{EVENTS_URL}?is_test__exact=1",
    ],
)
def test_delivery_lists_never_count_whole_table(
    admin_client: Client, application: Application, url: str
) -> None:
    make_destinations(application, 3)

    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(url)

    assert response.status_code == 200
    assert full_counts(queries) == []


def test_small_filtered_delivery_list_counts_exactly(
    admin_client: Client, application: Application
) -> None:
    make_destinations(application, 3)

    response = admin_client.get(f"{DELIVERIES_URL}?status__exact=failed")

    assert '<span class="result-count">3 deliveries</span>' in response.text


def test_large_delivery_list_shows_no_exact_total(
    admin_client: Client, application: Application, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pagination, "EXACT_LIMIT", 4)
    monkeypatch.setattr("delivery.admin.DeliveryAdmin.list_per_page", 2, raising=False)
    make_destinations(application, 3)

    response = admin_client.get(f"{DELIVERIES_URL}?is_test__exact=0")

    # PostgreSQL gives its estimate; other databases say only that there are more.
    expected = "About " if connection.vendor == "postgresql" else "More than 4 "
    count = re.search(r'<span class="result-count">(.*?)</span>', response.text)
    assert count is not None
    assert count.group(1).startswith(expected)
    assert "?is_test__exact=0&amp;p=2" in response.text


def test_open_ended_pages_reach_one_page_further(
    application: Application, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pagination, "planner_estimate", lambda queryset: None)
    make_destinations(application, 3)
    deliveries = Delivery.objects.filter(is_test=False).order_by("pk")

    paginator = pagination.LargeTablePaginator(
        deliveries, 2, page_number=3, exact_limit=4
    )

    assert paginator.count == 7
    assert paginator.open_ended
    assert paginator.num_pages == 4


def test_deep_page_reads_its_own_rows(application: Application) -> None:
    make_destinations(application, 3)
    deliveries = Delivery.objects.order_by("-pk")
    expected = list(deliveries.values_list("pk", flat=True))[2:4]

    page = pagination.LargeTablePaginator(deliveries, 2, page_number=2).page(2)

    assert [delivery.pk for delivery in page.object_list] == expected


def test_delivery_search_finds_event_id(
    admin_client: Client, application: Application
) -> None:
    destination = make_destinations(application, 2)[0]

    response = admin_client.get(f"{DELIVERIES_URL}?q=bad-{destination.pk}")

    assert '<span class="result-count">1 delivery</span>' in response.text
    assert f"bad-{destination.pk}" in response.text


def test_delivery_search_finds_object_key(
    admin_client: Client, application: Application
) -> None:
    make_destinations(application, 2)

    response = admin_client.get(f"{DELIVERIES_URL}?q=4102/order/1")

    assert '<span class="result-count">6 deliveries</span>' in response.text


def test_event_type_filter_offers_recent_types(
    admin_client: Client, application: Application
) -> None:
    make_destinations(application, 1)

    response = admin_client.get(f"{EVENTS_URL}?type=ORDER_CREATED")

    assert response.status_code == 200
    assert "?type=ORDER_CREATED" in response.text
    assert '<span class="result-count">3 events</span>' in response.text


# The CSV export.


def export(client: Client, destinations: list[Destination]) -> tuple[Any, str]:
    response = client.post(
        DESTINATIONS_URL,
        {
            "action": "export_csv",
            "_selected_action": [str(destination.pk) for destination in destinations],
        },
    )
    return response, response.getvalue().decode()


@pytest.fixture
def servicebus_destination(application: Application) -> Destination:
    destination = Destination(
        application=application,
        stage=Stage.PROD,
        kind=Kind.SERVICEBUS,
        name="Bus",
        servicebus_entity_name="orders",
    )
    destination.set_connection_string(CONNECTION_STRING)
    destination.save()
    return destination


def test_csv_export_streams_rows(
    admin_client: Client, application: Application
) -> None:
    destinations = make_destinations(application, 3)

    response, text = export(admin_client, destinations)
    rows = list(csv.DictReader(io.StringIO(text)))

    assert response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert [row["name"] for row in rows] == ["Queue 000", "Queue 001", "Queue 002"]
    assert rows[0]["application"] == "shop"
    assert rows[0]["last_delivery_status"] == "success"
    assert rows[0]["success_rate_24h"] == "50.0"
    assert rows[0]["attempts_24h"] == "2"


def test_csv_export_hides_service_bus_secret(
    admin_client: Client, servicebus_destination: Destination
) -> None:
    token = servicebus_destination.servicebus_connection_string

    _, text = export(admin_client, [servicebus_destination])
    row = next(csv.DictReader(io.StringIO(text)))

    assert SECRET_KEY_VALUE not in text
    assert token not in text
    assert "SharedAccessKey" not in text
    assert "gAAAAA" not in text
    assert row["target"] == servicebus_destination.servicebus_summary


def test_csv_export_defuses_formulas(
    admin_client: Client, application: Application
) -> None:
    destination = make_destinations(application, 1)[0]
    Destination.objects.filter(pk=destination.pk).update(name="=HYPERLINK(1)")

    _, text = export(admin_client, [destination])
    row = next(csv.DictReader(io.StringIO(text)))

    assert row["name"] == "'=HYPERLINK(1)"
