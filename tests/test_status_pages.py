"""The app developers' status pages: who may see what, the numbers they show,
and the actions they offer (test event, retry, replay, notifications)."""

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from django.contrib.auth.models import Permission
from django.core import mail
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from delivery import health, subscriptions
from delivery.ids import new_ulid
from delivery.models import (
    Attempt,
    Delivery,
    DeliveryStatus,
    Event,
    NotificationPreference,
    Outcome,
    Replay,
)
from delivery.status import queries
from delivery.status.queries import Health
from delivery.transports import Blame, Failure, Sent
from destinations import demo
from destinations.models import Application, Destination, Kind, Stage

if TYPE_CHECKING:
    from django.contrib.auth.models import User

pytestmark = pytest.mark.django_db

PASSWORD = "status-test-password-3"
ORDER_KEY = "4102/st-80233/order/FKO-1"


# Building rows.


def sqs_destination(
    application: Application,
    name: str = "Orders queue",
    stage: str = Stage.TEST,
    *,
    fifo: bool = False,
    **fields: Any,
) -> Destination:
    queue = "orders.fifo" if fifo else "orders"
    return Destination.objects.create(
        application=application,
        stage=stage,
        kind=Kind.SQS,
        name=name,
        sqs_queue_url=f"https://sqs.eu-west-1.amazonaws.com/123456789012/{queue}",
        sqs_fifo=fifo,
        **fields,
    )


def make_event(
    application: Application,
    *,
    stage: str = Stage.TEST,
    time: datetime | None = None,
    type: str = "ACCEPT",
    key: str = ORDER_KEY,
    data: dict[str, Any] | None = None,
    is_test: bool = False,
) -> Event:
    return Event.objects.create(
        id=new_ulid(),
        application=application,
        stage=stage,
        type=type,
        object_key=key,
        time=time or timezone.now(),
        data=data if data is not None else {"channel_order_id": "FKO-1"},
        is_test=is_test,
    )


def make_delivery(
    event: Event,
    destination: Destination,
    status: str = DeliveryStatus.DELIVERED,
) -> Delivery:
    return Delivery.objects.create(
        event=event,
        destination=destination,
        status=status,
        is_test=event.is_test,
        ordering_key=event.object_key if destination.is_ordered else "",
        event_time=event.time,
        next_attempt_at=timezone.now() if status == DeliveryStatus.PENDING else None,
    )


def add_attempt(
    delivery: Delivery,
    outcome: str = Outcome.SUCCESS,
    *,
    started_at: datetime | None = None,
    duration_ms: int = 40,
    error_kind: str = "",
    message: str = "",
) -> Attempt:
    return Attempt.objects.create(
        delivery=delivery,
        started_at=started_at or timezone.now(),
        duration_ms=duration_ms,
        outcome=outcome,
        error_kind=error_kind,
        message=message,
        remote_message_id="m-1" if outcome == Outcome.SUCCESS else "",
    )


def delivered_event(
    destination: Destination, started_at: datetime, outcome: str = Outcome.SUCCESS
) -> Attempt:
    event = make_event(destination.application, time=started_at)
    status = (
        DeliveryStatus.DELIVERED
        if outcome == Outcome.SUCCESS
        else DeliveryStatus.FAILED
    )
    return add_attempt(
        make_delivery(event, destination, status), outcome, started_at=started_at
    )


# People and their applications.


@pytest.fixture
def shop() -> Application:
    return Application.objects.create(
        name="Shop", slug="shop", contact_emails="ops@shop.example"
    )


@pytest.fixture
def other_shop() -> Application:
    return Application.objects.create(name="Other shop", slug="other-shop")


@pytest.fixture
def developer(django_user_model: type["User"], shop: Application) -> "User":
    user = django_user_model.objects.create_user(
        username="dev", email="dev@shop.example", password=PASSWORD
    )
    shop.developers.add(user)
    return user


@pytest.fixture
def outsider(django_user_model: type["User"], other_shop: Application) -> "User":
    user = django_user_model.objects.create_user(
        username="outsider", email="outsider@other.example", password=PASSWORD
    )
    other_shop.developers.add(user)
    return user


@pytest.fixture
def developer_client(client: Client, developer: "User") -> Client:
    client.force_login(developer)
    return client


@dataclass
class World:
    """One of every object a status URL names, all of application "shop"."""

    application: Application
    destination: Destination
    event: Event
    delivery: Delivery
    replay: Replay


@pytest.fixture
def world(shop: Application) -> World:
    destination = sqs_destination(shop)
    event = make_event(shop)
    delivery = make_delivery(event, destination, DeliveryStatus.FAILED)
    add_attempt(delivery, Outcome.PERMANENT_ERROR, error_kind="too_large")
    now = timezone.now()
    replay = Replay.objects.create(
        destination=destination,
        start=now - timedelta(hours=1),
        end=now,
        event_count=1,
    )
    return World(shop, destination, event, delivery, replay)


def scope_args(world: World) -> list[object]:
    return [world.application.slug, Stage.TEST]


# Every page and action, with the method that uses it and its URL arguments.
URLS: list[tuple[str, str, Callable[[World], list[object]]]] = [
    ("overview", "get", scope_args),
    ("destination", "get", lambda w: [*scope_args(w), w.destination.pk]),
    ("send-test", "post", lambda w: [*scope_args(w), w.destination.pk]),
    ("replay", "get", lambda w: [*scope_args(w), w.destination.pk]),
    ("replay", "post", lambda w: [*scope_args(w), w.destination.pk]),
    ("replay-progress", "get", lambda w: [*scope_args(w), w.replay.pk]),
    ("events", "get", scope_args),
    ("event", "get", lambda w: [*scope_args(w), w.event.pk]),
    ("retry", "post", lambda w: [*scope_args(w), w.delivery.pk]),
    ("notifications", "get", lambda w: [w.application.slug]),
    ("notifications", "post", lambda w: [w.application.slug]),
]
URL_IDS = [f"{method} {name}" for name, method, _ in URLS]
PAGES = [(name, args) for name, method, args in URLS if method == "get"]
PAGE_IDS = [name for name, _ in PAGES]
# What sends events, and the replay form that leads to it.
ACTIONS = [url for url in URLS if url[0] in ("send-test", "replay", "retry")]
ACTION_IDS = [f"{method} {name}" for name, method, _ in ACTIONS]
LOOK_PAGES = [(name, args) for name, args in PAGES if name != "replay"]
LOOK_PAGE_IDS = [name for name, _ in LOOK_PAGES]


def replay_form(start: datetime, end: datetime, **extra: str) -> dict[str, str]:
    return {
        "start": start.strftime("%Y-%m-%dT%H:%M"),
        "end": end.strftime("%Y-%m-%dT%H:%M"),
        **extra,
    }


# Access.


@pytest.mark.parametrize(("name", "method", "args"), URLS, ids=URL_IDS)
def test_other_application_developer_gets_404(
    client: Client,
    world: World,
    outsider: "User",
    name: str,
    method: str,
    args: Callable[[World], list[object]],
) -> None:
    client.force_login(outsider)
    url = reverse(f"status:{name}", args=args(world))

    response = getattr(client, method)(url)

    assert response.status_code == 404


@pytest.mark.parametrize(("name", "method", "args"), URLS, ids=URL_IDS)
def test_anonymous_user_is_sent_to_login(
    client: Client,
    world: World,
    name: str,
    method: str,
    args: Callable[[World], list[object]],
) -> None:
    url = reverse(f"status:{name}", args=args(world))

    response = getattr(client, method)(url)

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login") + "?next=")


@pytest.mark.parametrize(("name", "args"), PAGES, ids=PAGE_IDS)
def test_member_opens_every_page(
    developer_client: Client,
    world: World,
    name: str,
    args: Callable[[World], list[object]],
) -> None:
    response = developer_client.get(reverse(f"status:{name}", args=args(world)))

    assert response.status_code == 200


def make_staff(
    django_user_model: type["User"], *permissions: str, superuser: bool = False
) -> "User":
    staff = django_user_model.objects.create_user(
        username="staff", password=PASSWORD, is_staff=True, is_superuser=superuser
    )
    for codename in permissions:
        staff.user_permissions.add(
            Permission.objects.get(
                content_type__app_label="destinations", codename=codename
            )
        )
    return staff


@pytest.mark.parametrize(("name", "args"), LOOK_PAGES, ids=LOOK_PAGE_IDS)
def test_staff_with_view_permission_opens_pages(
    client: Client,
    world: World,
    django_user_model: type["User"],
    name: str,
    args: Callable[[World], list[object]],
) -> None:
    client.force_login(make_staff(django_user_model, "view_destination"))

    response = client.get(reverse(f"status:{name}", args=args(world)))

    assert response.status_code == 200


@pytest.mark.parametrize(("name", "method", "args"), URLS, ids=URL_IDS)
def test_staff_without_permissions_gets_404(
    client: Client,
    world: World,
    django_user_model: type["User"],
    name: str,
    method: str,
    args: Callable[[World], list[object]],
) -> None:
    client.force_login(make_staff(django_user_model))
    url = reverse(f"status:{name}", args=args(world))

    response = getattr(client, method)(url)

    assert response.status_code == 404


def test_staff_without_permissions_sees_no_application(
    client: Client, world: World, django_user_model: type["User"]
) -> None:
    client.force_login(make_staff(django_user_model))

    response = client.get(reverse("status:home"))

    assert response.context["rows"] == []


@pytest.mark.parametrize(("name", "method", "args"), ACTIONS, ids=ACTION_IDS)
def test_view_only_staff_cannot_act(
    client: Client,
    world: World,
    django_user_model: type["User"],
    name: str,
    method: str,
    args: Callable[[World], list[object]],
) -> None:
    client.force_login(make_staff(django_user_model, "view_destination"))
    url = reverse(f"status:{name}", args=args(world))
    now = timezone.now()

    response = getattr(client, method)(
        url, replay_form(now - timedelta(hours=1), now, confirm="1")
    )

    world.delivery.refresh_from_db()
    assert response.status_code == 403
    assert world.delivery.status == DeliveryStatus.FAILED
    assert not Delivery.objects.filter(is_test=True).exists()
    assert Replay.objects.count() == 1


def test_view_only_staff_sees_no_buttons(
    client: Client, world: World, django_user_model: type["User"]
) -> None:
    client.force_login(make_staff(django_user_model, "view_destination"))
    destination_url = reverse(
        "status:destination", args=[*scope_args(world), world.destination.pk]
    )
    event_url = reverse("status:event", args=[*scope_args(world), world.event.pk])

    destination_page = client.get(destination_url).text
    event_page = client.get(event_url).text

    assert "Send test event</button>" not in destination_page
    assert "Retry<span" not in destination_page
    assert "Retry<span" not in event_page


@pytest.mark.parametrize(
    "permissions", [("view_destination", "change_destination"), ()], ids=str
)
def test_allowed_staff_retries_delivery(
    client: Client,
    world: World,
    django_user_model: type["User"],
    permissions: tuple[str, ...],
) -> None:
    superuser = not permissions
    client.force_login(make_staff(django_user_model, *permissions, superuser=superuser))
    url = reverse("status:retry", args=[*scope_args(world), world.delivery.pk])

    response = client.post(url)

    world.delivery.refresh_from_db()
    assert response.status_code == 302
    assert world.delivery.status == DeliveryStatus.PENDING


def test_superuser_sends_test_event(
    client: Client, world: World, django_user_model: type["User"]
) -> None:
    client.force_login(make_staff(django_user_model, superuser=True))
    url = reverse("status:send-test", args=[*scope_args(world), world.destination.pk])

    response = client.post(url)

    assert response.status_code == 302
    assert Delivery.objects.filter(destination=world.destination, is_test=True).exists()


def test_superuser_replays_after_confirming(
    client: Client, world: World, django_user_model: type["User"]
) -> None:
    client.force_login(make_staff(django_user_model, superuser=True))
    url = reverse("status:replay", args=[*scope_args(world), world.destination.pk])
    now = timezone.now()

    response = client.post(
        url, replay_form(now - timedelta(days=1), now + timedelta(hours=1), confirm="1")
    )

    assert response.status_code == 302
    assert Replay.objects.count() == 2


def test_destination_of_other_stage_is_not_found(
    developer_client: Client, shop: Application
) -> None:
    prod = sqs_destination(shop, "PROD queue", Stage.PROD)

    url = reverse("status:destination", args=[shop.slug, Stage.TEST, prod.pk])

    assert developer_client.get(url).status_code == 404


def test_unknown_stage_matches_no_url(developer_client: Client) -> None:
    assert developer_client.get("/status/shop/STAGING/").status_code == 404


@pytest.mark.parametrize("event_id", ["%00", "01jndg9q00%00"])
def test_event_id_with_nul_not_found(
    developer_client: Client, world: World, event_id: str
) -> None:
    # PostgreSQL rejects a NUL in text, so the lookup must not reach it.
    response = developer_client.get(f"/status/shop/PROD/events/{event_id}/")

    assert response.status_code == 404


def test_home_lists_only_own_applications(
    developer_client: Client, shop: Application, other_shop: Application
) -> None:
    response = developer_client.get(reverse("status:home"))

    assert response.status_code == 200
    assert "Shop" in response.text
    assert "Other shop" not in response.text


def test_anonymous_home_is_sent_to_login(client: Client) -> None:
    response = client.get(reverse("status:home"))

    assert response.status_code == 302
    assert response["Location"] == reverse("login") + "?next=/status/"


def test_login_form_signs_in_developer(client: Client, developer: "User") -> None:
    page = client.get(reverse("login"))
    response = client.post(reverse("login"), {"username": "dev", "password": PASSWORD})

    assert page.status_code == 200
    assert 'for="id_username"' in page.text
    assert response.status_code == 302
    assert response["Location"] == reverse("status:home")


def test_logout_signs_out(developer_client: Client) -> None:
    response = developer_client.post(reverse("logout"))

    assert response.status_code == 302
    assert developer_client.get(reverse("status:home")).status_code == 302


def test_base_template_has_landmarks_and_skip_link(
    developer_client: Client, world: World
) -> None:
    html = developer_client.get(reverse("status:overview", args=scope_args(world)))

    assert 'class="skip-link" href="#main"' in html.text
    assert '<main id="main"' in html.text
    assert "<header" in html.text
    assert "<nav" in html.text
    assert "<caption>" in html.text


# The overview's numbers.


def test_overview_counts_last_day_attempts(shop: Application) -> None:
    destination = sqs_destination(shop)
    now = timezone.now()
    for _ in range(3):
        delivered_event(destination, now - timedelta(hours=1))
    delivered_event(destination, now - timedelta(hours=2), Outcome.TRANSIENT_ERROR)
    delivered_event(destination, now - timedelta(hours=30))
    test_event = make_event(shop, is_test=True)
    add_attempt(make_delivery(test_event, destination), Outcome.PERMANENT_ERROR)

    [summary] = queries.overview(shop, Stage.TEST, now)

    assert summary.attempts == 4
    assert summary.successes == 3
    assert summary.success_rate == 0.75
    assert summary.success_percent == "75.0 %"


def test_overview_counts_pending_and_held(shop: Application) -> None:
    destination = sqs_destination(shop)
    for status in ("pending", "pending", "held", "delivered", "failed", "sending"):
        make_delivery(make_event(shop), destination, status)

    [summary] = queries.overview(shop, Stage.TEST, timezone.now())

    assert summary.pending == 2
    assert summary.held == 1


def test_overview_without_attempts_has_no_rate(shop: Application) -> None:
    sqs_destination(shop)

    [summary] = queries.overview(shop, Stage.TEST, timezone.now())

    assert summary.attempts == 0
    assert summary.success_rate is None
    assert summary.report.health == Health.HEALTHY


def test_overview_keeps_to_its_stage(shop: Application) -> None:
    sqs_destination(shop, "TEST queue")
    sqs_destination(shop, "PROD queue", Stage.PROD)

    summaries = queries.overview(shop, Stage.PROD, timezone.now())

    assert [summary.destination.name for summary in summaries] == ["PROD queue"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, Health.HEALTHY),
        ({"consecutive_failures": 2, "last_error": "timeout: x"}, Health.FAILING),
        ({"paused_at": datetime(2026, 1, 1, tzinfo=UTC)}, Health.PAUSED),
        (
            {"enabled": False, "disabled_at": datetime(2026, 1, 1, tzinfo=UTC)},
            Health.DISABLED,
        ),
        ({"enabled": False}, Health.DISABLED),
    ],
    ids=["healthy", "failing", "paused", "disabled", "off"],
)
def test_health_follows_destination_state(
    shop: Application, fields: dict[str, Any], expected: Health
) -> None:
    destination = sqs_destination(shop, **fields)

    assert queries.health_of(destination).health == expected


def test_failing_health_gives_last_error(shop: Application) -> None:
    destination = sqs_destination(
        shop, consecutive_failures=1, last_error="access_denied: grant it"
    )

    assert queries.health_of(destination).reason == "access_denied: grant it"


def test_overview_page_shows_state_and_rate(
    developer_client: Client, shop: Application
) -> None:
    destination = sqs_destination(shop, paused_at=timezone.now(), pause_reason="Nope")
    delivered_event(destination, timezone.now())

    response = developer_client.get(
        reverse("status:overview", args=[shop.slug, Stage.TEST])
    )

    assert 'class="health health-paused"' in response.text
    assert "Nope" in response.text
    assert "100.0 %" in response.text


def overview_queries(client: Client, application: Application) -> int:
    url = reverse("status:overview", args=[application.slug, Stage.TEST])
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200
    return len(captured)


def test_overview_query_count_is_constant(
    developer_client: Client, shop: Application
) -> None:
    first = sqs_destination(shop, "queue 0")
    delivered_event(first, timezone.now())
    with_one = overview_queries(developer_client, shop)

    for number in range(1, 12):
        destination = sqs_destination(shop, f"queue {number}")
        delivered_event(destination, timezone.now())
        make_delivery(make_event(shop), destination, DeliveryStatus.PENDING)
    with_twelve = overview_queries(developer_client, shop)

    assert with_twelve == with_one


def test_overview_stays_within_query_budget(
    developer_client: Client,
    shop: Application,
    django_assert_max_num_queries: Any,
) -> None:
    for number in range(20):
        destination = sqs_destination(shop, f"queue {number}")
        delivered_event(destination, timezone.now())
    url = reverse("status:overview", args=[shop.slug, Stage.TEST])

    # Session, user, application, destinations, success rates, backlog.
    with django_assert_max_num_queries(6):
        developer_client.get(url)


# The destination page.


def test_hourly_attempts_count_per_hour(shop: Application) -> None:
    destination = sqs_destination(shop)
    now = datetime(2026, 12, 4, 15, 30, tzinfo=UTC)
    delivered_event(destination, datetime(2026, 12, 4, 15, 5, tzinfo=UTC))
    delivered_event(destination, datetime(2026, 12, 4, 15, 25, tzinfo=UTC))
    delivered_event(
        destination, datetime(2026, 12, 4, 15, 10, tzinfo=UTC), Outcome.TRANSIENT_ERROR
    )
    delivered_event(destination, datetime(2026, 12, 1, 9, 59, tzinfo=UTC))
    # Older than the 7 days the chart covers.
    delivered_event(destination, datetime(2026, 11, 27, 15, 0, tzinfo=UTC))

    hours = queries.hourly_attempts(destination, now)
    by_hour = {entry.hour: entry for entry in hours}

    assert len(hours) == queries.CHART_HOURS
    assert hours[-1].hour == datetime(2026, 12, 4, 15, tzinfo=UTC)
    assert by_hour[datetime(2026, 12, 4, 15, tzinfo=UTC)].delivered == 2
    assert by_hour[datetime(2026, 12, 4, 15, tzinfo=UTC)].failed == 1
    assert by_hour[datetime(2026, 12, 1, 9, tzinfo=UTC)].delivered == 1
    assert sum(entry.delivered for entry in hours) == 3


def test_chart_data_uses_unix_seconds(shop: Application) -> None:
    hour = datetime(2026, 12, 4, 15, tzinfo=UTC)

    data = queries.chart_data([queries.HourCount(hour, 2, 1)])

    assert data == {"hours": [int(hour.timestamp())], "delivered": [2], "failed": [1]}


def test_latency_percentiles_interpolate(shop: Application) -> None:
    destination = sqs_destination(shop)
    now = timezone.now()
    event = make_event(shop)
    delivery = make_delivery(event, destination)
    for duration in range(1, 101):
        add_attempt(delivery, started_at=now - timedelta(hours=2), duration_ms=duration)
    add_attempt(delivery, started_at=now - timedelta(days=3), duration_ms=5000)
    add_attempt(
        delivery,
        Outcome.TRANSIENT_ERROR,
        started_at=now - timedelta(hours=1),
        duration_ms=10_000,
    )

    day, week = queries.latency(destination, now)

    assert day.count == 100
    assert day.percentiles[0.5] == pytest.approx(50.5)
    assert day.percentiles[0.9] == pytest.approx(90.1)
    assert day.percentiles[0.99] == pytest.approx(99.01)
    assert week.count == 101
    assert week.percentiles[0.5] == pytest.approx(51)
    assert week.percentiles[0.99] == pytest.approx(100)


def test_latency_of_idle_destination_is_empty(shop: Application) -> None:
    destination = sqs_destination(shop)

    day, week = queries.latency(destination, timezone.now())

    assert day.count == 0
    assert week.percentiles == {}
    assert week.p50 == ""


def test_python_percentile_matches_percentile_cont() -> None:
    values = [10, 20, 30, 40]

    assert queries.percentile(values, 0.5) == 25
    assert queries.percentile(values, 0.9) == pytest.approx(37)
    assert queries.percentile([7], 0.99) == 7


def test_destination_page_shows_hourly_table(
    developer_client: Client, shop: Application
) -> None:
    destination = sqs_destination(shop)
    now = timezone.now()
    delivered_event(destination, now)
    delivered_event(destination, now, Outcome.TRANSIENT_ERROR)
    url = reverse("status:destination", args=[shop.slug, Stage.TEST, destination.pk])

    response = developer_client.get(url)

    assert response.context["delivered_total"] == 1
    assert response.context["failed_total"] == 1
    assert 'id="hourly-data"' in response.text
    assert 'id="hourly-chart"' in response.text
    assert '<td class="number delivered-total">1</td>' in response.text


def test_destination_page_lists_recent_failures(
    developer_client: Client, shop: Application
) -> None:
    destination = sqs_destination(shop)
    event = make_event(shop)
    delivery = make_delivery(event, destination, DeliveryStatus.FAILED)
    add_attempt(
        delivery,
        Outcome.PERMANENT_ERROR,
        error_kind="too_large",
        message="Raise the queue's MaximumMessageSize <now>.",
    )
    url = reverse("status:destination", args=[shop.slug, Stage.TEST, destination.pk])

    response = developer_client.get(url)

    assert "Raise the queue&#x27;s MaximumMessageSize &lt;now&gt;." in response.text
    assert reverse("status:retry", args=[shop.slug, Stage.TEST, delivery.pk]) in (
        response.text
    )


def test_destination_page_shows_stage_grant(
    developer_client: Client, shop: Application, settings: Any
) -> None:
    settings.STAGE_IDENTITIES = {
        "TEST": {"aws_principal_arn": "arn:aws:iam::111122223333:role/test-sender"},
        "PROD": {"aws_principal_arn": "arn:aws:iam::444455556666:role/prod-sender"},
    }
    destination = sqs_destination(shop)
    url = reverse("status:destination", args=[shop.slug, Stage.TEST, destination.pk])

    response = developer_client.get(url)

    assert "role/test-sender" in response.text
    assert "role/prod-sender" not in response.text
    assert "sqs:SendMessage" in response.text


def test_send_test_event_queues_delivery(
    developer_client: Client, shop: Application, developer: "User"
) -> None:
    destination = sqs_destination(shop)
    url = reverse("status:send-test", args=[shop.slug, Stage.TEST, destination.pk])

    response = developer_client.post(url, follow=True)

    delivery = Delivery.objects.get(destination=destination, is_test=True)
    assert delivery.status == DeliveryStatus.PENDING
    assert delivery.event.data["requested_by"] == developer.username
    assert 'data-status="queued"' in response.text


def test_send_test_event_rejects_get(
    developer_client: Client, shop: Application
) -> None:
    destination = sqs_destination(shop)
    url = reverse("status:send-test", args=[shop.slug, Stage.TEST, destination.pk])

    assert developer_client.get(url).status_code == 405
    assert not Delivery.objects.exists()


def test_latest_test_result_shows_message_id(
    developer_client: Client, shop: Application
) -> None:
    destination = sqs_destination(shop)
    delivery = make_delivery(make_event(shop, is_test=True), destination)
    Attempt.objects.create(
        delivery=delivery,
        started_at=timezone.now(),
        duration_ms=12,
        outcome=Outcome.SUCCESS,
        remote_message_id="sqs-message-7",
    )
    url = reverse("status:destination", args=[shop.slug, Stage.TEST, destination.pk])

    response = developer_client.get(url)

    assert 'data-status="success"' in response.text
    assert "sqs-message-7" in response.text


# Events.


def search(client: Client, application: Application, **query: str) -> Any:
    url = reverse("status:events", args=[application.slug, Stage.TEST])
    return client.get(url, query)


def found_ids(response: Any) -> list[str]:
    return [event.pk for event in response.context["page"].object_list]


def test_event_search_by_id_key_and_type(
    developer_client: Client, shop: Application
) -> None:
    accept = make_event(shop, type="ACCEPT", key="k/1")
    cancel = make_event(shop, type="CANCEL", key="k/2")

    by_id = search(developer_client, shop, event_id=accept.pk)
    by_key = search(developer_client, shop, object_key="k/2")
    by_type = search(developer_client, shop, type="ACCEPT")

    assert found_ids(by_id) == [accept.pk]
    assert found_ids(by_key) == [cancel.pk]
    assert found_ids(by_type) == [accept.pk]


def test_event_search_by_time_range(
    developer_client: Client, shop: Application
) -> None:
    inside = make_event(shop, time=datetime(2026, 12, 1, 10, 30, tzinfo=UTC))
    make_event(shop, time=datetime(2026, 12, 1, 11, 0, tzinfo=UTC))
    make_event(shop, time=datetime(2026, 12, 1, 9, 59, tzinfo=UTC))

    response = search(
        developer_client, shop, start="2026-12-01T10:00", end="2026-12-01T11:00"
    )

    assert found_ids(response) == [inside.pk]


def test_event_search_keeps_to_application_and_stage(
    developer_client: Client, shop: Application, other_shop: Application
) -> None:
    own = make_event(shop, key="k/shared")
    make_event(other_shop, key="k/shared")
    make_event(shop, key="k/shared", stage=Stage.PROD)

    response = search(developer_client, shop, object_key="k/shared")

    assert found_ids(response) == [own.pk]


def test_event_search_rejects_reversed_range(
    developer_client: Client, shop: Application
) -> None:
    make_event(shop)

    response = search(
        developer_client, shop, start="2026-12-02T10:00", end="2026-12-01T10:00"
    )

    assert found_ids(response) == []
    assert "is not after the start" in response.text


# Times that leave the years 1 to 9999 once converted to UTC.
OUT_OF_RANGE_TIMES = ["0001-01-01T00:00+01:00", "9999-12-31T23:59-01:00"]


@pytest.mark.parametrize("field", ["start", "end"])
@pytest.mark.parametrize("value", OUT_OF_RANGE_TIMES)
def test_event_search_rejects_out_of_range_time(
    developer_client: Client, shop: Application, field: str, value: str
) -> None:
    make_event(shop)

    response = search(developer_client, shop, **{field: value})

    assert response.status_code == 200
    assert found_ids(response) == []
    errors = response.context["form"].errors[field]
    assert len(errors) == 1
    assert repr(value) in errors[0]
    assert "outside 0001-01-01 00:00 to 9999-12-31 23:59 UTC" in errors[0]


def test_event_search_finds_first_and_last_years(
    developer_client: Client, shop: Application
) -> None:
    first = make_event(shop, time=datetime(1, 1, 1, tzinfo=UTC))
    last = make_event(shop, time=datetime(9999, 12, 31, 23, 58, tzinfo=UTC))

    response = search(
        developer_client, shop, start="0001-01-01T00:00", end="9999-12-31T23:59"
    )

    assert response.status_code == 200
    assert found_ids(response) == [last.pk, first.pk]


def test_event_search_rejects_unparsable_time(
    developer_client: Client, shop: Application
) -> None:
    response = search(developer_client, shop, start="10000-01-01T00:00")

    errors = response.context["form"].errors["start"]
    assert response.status_code == 200
    assert errors == [
        "From (UTC): '10000-01-01T00:00' is not a date and time. Enter one such as "
        "2025-03-03 08:00, in UTC."
    ]


def test_event_search_paginates(developer_client: Client, shop: Application) -> None:
    start = timezone.now() - timedelta(hours=1)
    for minute in range(51):
        make_event(shop, time=start + timedelta(minutes=minute), type="ACCEPT")

    first = search(developer_client, shop, type="ACCEPT")
    second = search(developer_client, shop, type="ACCEPT", page="2")

    assert len(found_ids(first)) == 50
    assert len(found_ids(second)) == 1
    assert "type=ACCEPT&amp;page=2" in first.text


def test_event_page_escapes_payload(
    developer_client: Client, shop: Application
) -> None:
    event = make_event(shop, data={"note": "<script>alert(1)</script>"})
    url = reverse("status:event", args=[shop.slug, Stage.TEST, event.pk])

    response = developer_client.get(url)

    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
    assert "<script>alert(1)" not in response.text
    assert '"note": ' in response.text.replace("&quot;", '"')


@pytest.mark.skipif(
    connection.vendor == "postgresql",
    reason="PostgreSQL's jsonb rejects lone surrogates, so no such event exists",
)
@pytest.mark.parametrize("published_text", [True, False], ids=["text", "no-text"])
def test_event_page_escapes_stored_lone_surrogate(
    developer_client: Client, shop: Application, published_text: bool
) -> None:
    # Recorded before publishing rejected lone surrogates: SQLite keeps the escape.
    event = make_event(shop, data={"note": "a\ud800"})
    if published_text:
        Event.objects.filter(pk=event.pk).update(
            envelope_json=json.dumps(event.envelope())
        )
    url = reverse("status:event", args=[shop.slug, Stage.TEST, event.pk])

    response = developer_client.get(url)

    assert response.status_code == 200
    assert '"note": "a\\ud800"' in response.text.replace("&quot;", '"')


def test_event_page_lists_every_attempt(
    developer_client: Client, shop: Application
) -> None:
    destination = sqs_destination(shop)
    event = make_event(shop)
    delivery = make_delivery(event, destination)
    add_attempt(
        delivery,
        Outcome.TRANSIENT_ERROR,
        started_at=timezone.now() - timedelta(minutes=5),
        error_kind="timeout",
        message="Sending timed out.",
    )
    add_attempt(delivery)
    url = reverse("status:event", args=[shop.slug, Stage.TEST, event.pk])

    response = developer_client.get(url)

    [shown] = response.context["deliveries"]
    outcomes = [attempt.outcome for attempt in shown.attempts.all()]
    assert outcomes == [Outcome.TRANSIENT_ERROR, Outcome.SUCCESS]
    assert "Sending timed out." in response.text
    assert "m-1" in response.text


def test_event_page_shows_waiting_for_earlier_event(
    developer_client: Client, shop: Application
) -> None:
    destination = sqs_destination(shop, fifo=True)
    now = timezone.now()
    earlier = make_event(shop, time=now - timedelta(minutes=1))
    later = make_event(shop, time=now)
    make_delivery(earlier, destination, DeliveryStatus.PENDING)
    make_delivery(later, destination, DeliveryStatus.PENDING)

    later_page = developer_client.get(
        reverse("status:event", args=[shop.slug, Stage.TEST, later.pk])
    )
    earlier_page = developer_client.get(
        reverse("status:event", args=[shop.slug, Stage.TEST, earlier.pk])
    )

    assert "Waiting for an earlier event of the same object" in later_page.text
    assert earlier.pk in later_page.text
    assert "Waiting for an earlier event" not in earlier_page.text


# Retry and replay.


def test_retry_queues_failed_delivery(developer_client: Client, world: World) -> None:
    url = reverse("status:retry", args=[*scope_args(world), world.delivery.pk])

    response = developer_client.post(url)

    world.delivery.refresh_from_db()
    assert response.status_code == 302
    assert response["Location"] == reverse(
        "status:event", args=[*scope_args(world), world.event.pk]
    )
    assert world.delivery.status == DeliveryStatus.PENDING


def test_retry_leaves_delivered_delivery(
    developer_client: Client, world: World
) -> None:
    Delivery.objects.filter(pk=world.delivery.pk).update(
        status=DeliveryStatus.DELIVERED
    )
    url = reverse("status:retry", args=[*scope_args(world), world.delivery.pk])

    response = developer_client.post(url, follow=True)

    world.delivery.refresh_from_db()
    assert world.delivery.status == DeliveryStatus.DELIVERED
    assert "not failed, so it was not retried" in response.text


def test_replay_asks_for_confirmation_with_count(
    developer_client: Client, shop: Application
) -> None:
    destination = sqs_destination(shop)
    now = timezone.now().replace(second=0, microsecond=0)
    for minutes in (10, 20, 30):
        make_delivery(
            make_event(shop, time=now - timedelta(minutes=minutes)), destination
        )
    make_event(shop, time=now - timedelta(minutes=15), is_test=True)
    url = reverse("status:replay", args=[shop.slug, Stage.TEST, destination.pk])

    response = developer_client.post(url, replay_form(now - timedelta(minutes=25), now))

    assert response.context["count"] == 2
    assert "This sends <strong>2</strong> events" in response.text
    assert not Replay.objects.exists()
    assert set(Delivery.objects.values_list("status", flat=True)) == {"delivered"}


def test_replay_confirmed_queues_and_shows_progress(
    developer_client: Client, shop: Application, developer: "User"
) -> None:
    destination = sqs_destination(shop)
    now = timezone.now().replace(second=0, microsecond=0)
    for minutes in (10, 20):
        make_delivery(
            make_event(shop, time=now - timedelta(minutes=minutes)), destination
        )
    url = reverse("status:replay", args=[shop.slug, Stage.TEST, destination.pk])

    response = developer_client.post(
        url, replay_form(now - timedelta(hours=1), now, confirm="yes"), follow=True
    )

    replay = Replay.objects.get()
    assert replay.event_count == 2
    assert replay.requested_by == developer
    assert response.redirect_chain[-1][0] == reverse(
        "status:replay-progress", args=[shop.slug, Stage.TEST, replay.pk]
    )
    assert response.context["progress"].pending == 2
    assert '<meta http-equiv="refresh"' in response.text


def test_replay_progress_stops_refreshing_when_done(
    developer_client: Client, world: World
) -> None:
    Delivery.objects.filter(pk=world.delivery.pk).update(
        status=DeliveryStatus.DELIVERED
    )
    url = reverse("status:replay-progress", args=[*scope_args(world), world.replay.pk])

    response = developer_client.get(url)

    assert response.context["progress"].delivered == 1
    assert response.context["progress"].finished
    assert "http-equiv" not in response.text


def test_replay_rejects_reversed_range(developer_client: Client, world: World) -> None:
    now = timezone.now()
    url = reverse("status:replay", args=[*scope_args(world), world.destination.pk])

    response = developer_client.post(
        url, replay_form(now, now - timedelta(hours=1), confirm="yes")
    )

    assert response.status_code == 200
    assert "is not after the start" in response.text
    assert Replay.objects.count() == 1


def test_replay_reversed_range_shows_four_digit_years(
    developer_client: Client, world: World
) -> None:
    url = reverse("status:replay", args=[*scope_args(world), world.destination.pk])
    form = {"start": "0002-01-01T00:00", "end": "0001-01-01T00:00"}

    response = developer_client.post(url, form)

    errors = response.context["form"].errors["end"]
    assert errors == [
        "The end (0001-01-01 00:00) is not after the start (0002-01-01 00:00). "
        "Choose an end after the start."
    ]


@pytest.mark.parametrize("confirm", [{}, {"confirm": "yes"}], ids=["count", "confirm"])
def test_replay_rejects_out_of_range_time(
    developer_client: Client, world: World, confirm: dict[str, str]
) -> None:
    url = reverse("status:replay", args=[*scope_args(world), world.destination.pk])
    form = {"start": OUT_OF_RANGE_TIMES[0], "end": OUT_OF_RANGE_TIMES[1], **confirm}

    response = developer_client.post(url, form)

    assert response.status_code == 200
    errors = response.context["form"].errors
    assert repr(OUT_OF_RANGE_TIMES[0]) in errors["start"][0]
    assert repr(OUT_OF_RANGE_TIMES[1]) in errors["end"][0]
    assert Replay.objects.count() == 1


def test_replay_accepts_first_and_last_years(
    developer_client: Client, world: World
) -> None:
    url = reverse("status:replay", args=[*scope_args(world), world.destination.pk])
    form = {"start": "0001-01-01T00:00", "end": "9999-12-31T23:59", "confirm": "yes"}

    response = developer_client.post(url, form, follow=True)

    assert response.status_code == 200
    assert response.context["progress"].total == 1
    assert "0001-01-01 00:00 until 9999-12-31 23:59 UTC" in response.text


# Notifications.


def test_notification_settings_save_choices(
    developer_client: Client, shop: Application, developer: "User"
) -> None:
    url = reverse("status:notifications", args=[shop.slug])

    response = developer_client.post(url, {"on_paused": "on", "on_recovered": "on"})

    preference = NotificationPreference.objects.get(user=developer, application=shop)
    assert response.status_code == 302
    assert preference.on_paused
    assert preference.on_recovered
    assert not preference.on_failing
    assert not preference.on_disabled


@pytest.fixture
def subscriber(developer: "User", shop: Application) -> NotificationPreference:
    return NotificationPreference.objects.create(
        user=developer,
        application=shop,
        on_failing=True,
        on_paused=True,
        on_disabled=True,
        on_recovered=True,
    )


def transient(message: str = "SQS timed out.") -> Failure:
    return Failure(kind="timeout", message=message, permanent=False)


def outcome_of(*results: Sent | Failure) -> health.BatchOutcome:
    outcome = health.BatchOutcome()
    for result in results:
        outcome.add(result)
    return outcome


def mails_to(address: str) -> list[Any]:
    return [message for message in mail.outbox if address in message.to]


def test_first_failure_mails_subscriber(
    shop: Application,
    subscriber: NotificationPreference,
    django_capture_on_commit_callbacks: Any,
) -> None:
    destination = sqs_destination(shop)

    with django_capture_on_commit_callbacks(execute=True):
        health.apply(destination, outcome_of(transient()), timezone.now())
    with django_capture_on_commit_callbacks(execute=True):
        health.apply(destination, outcome_of(transient()), timezone.now())

    [message] = mails_to("dev@shop.example")
    assert message.subject == "[Shop TEST] Delivery is failing"
    assert "timeout: SQS timed out." in message.body


def test_first_success_after_failures_mails_recovery(
    shop: Application,
    subscriber: NotificationPreference,
    django_capture_on_commit_callbacks: Any,
) -> None:
    destination = sqs_destination(
        shop, consecutive_failures=3, failing_since=timezone.now()
    )

    with django_capture_on_commit_callbacks(execute=True):
        health.apply(destination, outcome_of(Sent("m-1")), timezone.now())
    with django_capture_on_commit_callbacks(execute=True):
        health.apply(destination, outcome_of(Sent("m-2")), timezone.now())

    [message] = mails_to("dev@shop.example")
    assert message.subject == "[Shop TEST] Delivery recovered"


def test_pause_mails_subscriber_and_contacts(
    shop: Application,
    subscriber: NotificationPreference,
    django_capture_on_commit_callbacks: Any,
) -> None:
    destination = sqs_destination(shop)
    denied = Failure(
        kind="access_denied",
        message="Grant sqs:SendMessage.",
        permanent=True,
        blame=Blame.DESTINATION,
    )

    with django_capture_on_commit_callbacks(execute=True):
        health.apply(destination, outcome_of(denied), timezone.now())

    [message] = mails_to("dev@shop.example")
    assert message.subject == "[Shop TEST] Delivery paused"
    assert "Grant sqs:SendMessage." in message.body
    assert len(mails_to("ops@shop.example")) == 1


def test_disable_mails_subscriber(
    shop: Application,
    subscriber: NotificationPreference,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    settings.AUTO_DISABLE_AFTER_FAILURES = 2
    destination = sqs_destination(shop)

    with django_capture_on_commit_callbacks(execute=True):
        health.apply(destination, outcome_of(transient(), transient()), timezone.now())

    subjects = [message.subject for message in mails_to("dev@shop.example")]
    assert subjects == [
        "[Shop TEST] Delivery is failing",
        "[Shop TEST] Destination disabled",
    ]


def test_enable_mails_recovery_only_after_a_delivery(
    shop: Application,
    subscriber: NotificationPreference,
    django_capture_on_commit_callbacks: Any,
) -> None:
    now = timezone.now()
    destination = sqs_destination(
        shop, paused_at=now, pause_reason="x", failing_since=now
    )
    make_delivery(make_event(shop), destination, DeliveryStatus.HELD)

    with django_capture_on_commit_callbacks(execute=True):
        health.enable(destination)

    assert mails_to("dev@shop.example") == []

    outcome = health.BatchOutcome()
    outcome.add(Sent(remote_message_id="m-1"))
    with django_capture_on_commit_callbacks(execute=True):
        health.apply(destination, outcome, timezone.now())

    [message] = mails_to("dev@shop.example")
    assert message.subject == "[Shop TEST] Delivery recovered"


def test_enable_of_active_destination_mails_nobody(
    shop: Application,
    subscriber: NotificationPreference,
    django_capture_on_commit_callbacks: Any,
) -> None:
    destination = sqs_destination(shop)

    with django_capture_on_commit_callbacks(execute=True):
        health.enable(destination)

    assert mails_to("dev@shop.example") == []


def test_unchosen_change_mails_nobody(shop: Application, developer: "User") -> None:
    NotificationPreference.objects.create(
        user=developer, application=shop, on_paused=True
    )
    destination = sqs_destination(shop)

    sent = subscriptions.send_notifications(
        destination.pk, subscriptions.Change.FAILING, "x"
    )

    assert sent == 0
    assert mail.outbox == []


def test_removed_developer_is_not_mailed(
    shop: Application, developer: "User", subscriber: NotificationPreference
) -> None:
    shop.developers.remove(developer)
    destination = sqs_destination(shop)

    sent = subscriptions.send_notifications(
        destination.pk, subscriptions.Change.PAUSED, "x"
    )

    assert sent == 0


# Demo data.


def test_demo_status_seed_adds_history_once(shop: Application) -> None:
    Application.objects.filter(pk=shop.pk).update(slug=demo.DEMO_SLUG)
    for name, queue in demo.SQS_QUEUES.items():
        sqs_destination(shop, name, fifo=queue.endswith(".fifo"))

    login = demo.seed_status_demo()
    events = Event.objects.filter(application=shop).count()
    again = demo.seed_status_demo()

    paused = Destination.objects.get(name=demo.PAUSED_NAME)
    assert login.username == "developer"
    assert again.password != login.password
    assert shop.developers.filter(username="developer").exists()
    assert events > 100
    assert Event.objects.filter(application=shop).count() == events
    assert paused.paused_at is not None
    assert paused.pause_reason
    assert Attempt.objects.exclude(outcome=Outcome.SUCCESS).exists()
    assert Delivery.objects.filter(destination=paused, status="held").exists()


def test_replay_progress_waits_without_refresh_when_off(
    developer_client: Client, world: World
) -> None:
    Delivery.objects.filter(pk=world.delivery.pk).update(status=DeliveryStatus.PENDING)
    Destination.objects.filter(pk=world.destination.pk).update(enabled=False)
    url = reverse("status:replay-progress", args=[*scope_args(world), world.replay.pk])

    response = developer_client.get(url)

    assert response.context["progress"].pending == 1
    assert "http-equiv" not in response.text
    assert "wait until the destination is enabled again" in response.text


def test_notification_page_warns_staff_non_member(
    client: Client, shop: Application, django_user_model: type["User"]
) -> None:
    staff = make_staff(django_user_model, "view_destination")
    client.force_login(staff)

    response = client.get(reverse("status:notifications", args=[shop.slug]))

    assert "no mail about it is sent to you" in response.text


@pytest.mark.django_db
def test_root_sends_staff_to_admin(admin_client: Client) -> None:
    response = admin_client.get("/")

    assert response.status_code == 302
    assert response["Location"] == reverse("admin:index")


@pytest.mark.django_db
def test_root_sends_others_to_status_pages(client: Client) -> None:
    response = client.get("/")

    assert response.status_code == 302
    assert response["Location"] == reverse("status:home")
