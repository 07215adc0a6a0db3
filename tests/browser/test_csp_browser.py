"""The Content Security Policy in a real browser: the admin's and the status pages'
scripts and styles load under the enforced policy, and Chromium reports no
violation."""

from collections.abc import Iterator

import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from playwright.sync_api import ConsoleMessage, Page, expect
from pytest_django import Settings

from delivery.ids import new_ulid
from delivery.models import Attempt, Delivery, DeliveryStatus, Event, Outcome
from delivery.publishing import publish
from destinations.models import Application, Destination, Kind, Stage

from .conftest import ADMIN_PASSWORD, ADMIN_USERNAME, log_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DEVELOPER_PASSWORD = "csp-browser-password-6"
# Text Chromium puts in the console message of every blocked script, style or
# other resource.
VIOLATION = "Content Security Policy"


class Violations:
    """What Chromium reported about the policy while the test ran: console
    messages and `securitypolicyviolation` events."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.console: list[str] = []
        page.on("console", self._on_console)
        page.add_init_script(
            "window.__cspViolations = [];"
            "document.addEventListener('securitypolicyviolation', (event) => {"
            "  window.__cspViolations.push("
            "    event.violatedDirective + ' ' + (event.blockedURI || 'inline'));"
            "});"
        )

    def _on_console(self, message: ConsoleMessage) -> None:
        if VIOLATION in message.text:
            self.console.append(message.text)

    def events(self) -> list[str]:
        return list(self.page.evaluate("window.__cspViolations || []"))


@pytest.fixture(autouse=True)
def enforced_policy(settings: Settings) -> None:
    assert settings.CONTENT_SECURITY_POLICY == "enforce"
    assert settings.SECURE_CSP


@pytest.fixture
def violations(page: Page) -> Iterator[Violations]:
    yield Violations(page)


@pytest.fixture
def shop() -> Application:
    return Application.objects.create(name="Shop", slug="shop")


@pytest.fixture
def destination(shop: Application) -> Destination:
    destination = Destination.objects.create(
        application=shop,
        stage=Stage.TEST,
        kind=Kind.SQS,
        name="Orders",
        sqs_queue_url="https://sqs.eu-west-1.amazonaws.com/123456789012/orders",
    )
    # One delivered event, so the status page draws its chart.
    now = timezone.now()
    publish(
        shop,
        Stage.TEST,
        {
            "id": new_ulid(int(now.timestamp() * 1000)),
            "time": now.isoformat().replace("+00:00", "Z"),
            "type": "ACCEPT",
            "data": {
                "channel_id": "4102",
                "channel_store_id": "st-80233",
                "channel_order_id": "FKO-0001",
            },
        },
    )
    delivery = Delivery.objects.get(destination=destination)
    Delivery.objects.filter(pk=delivery.pk).update(status=DeliveryStatus.DELIVERED)
    Attempt.objects.create(
        delivery=delivery,
        started_at=now,
        duration_ms=12,
        outcome=Outcome.SUCCESS,
        remote_message_id="m-1",
    )
    return destination


def visit(page: Page, violations: Violations, path: str) -> None:
    response = page.goto(path)
    assert response is not None
    assert response.ok, f"{path} answered {response.status}"
    # The nonce appears in the header only on pages that use it.
    policy = response.headers.get("content-security-policy", "")
    assert "script-src 'self'" in policy
    page.wait_for_load_state("load")
    assert violations.console == [], f"{path}: {violations.console}"
    assert violations.events() == [], f"{path}: {violations.events()}"


def test_admin_pages_load_without_violation(
    admin_page: Page, violations: Violations, destination: Destination
) -> None:
    for path in (
        "/admin/",
        "/admin/destinations/destination/",
        "/admin/destinations/destination/add/",
        "/admin/destinations/destination/add/?kind=sqs",
        f"/admin/destinations/destination/{destination.pk}/change/",
        f"/admin/destinations/destination/{destination.pk}/history/",
        "/admin/destinations/destination/rotate-secrets/",
        "/admin/destinations/application/add/",
        "/admin/delivery/delivery/",
    ):
        visit(admin_page, violations, path)


def test_admin_scripts_run_under_policy(
    admin_page: Page, violations: Violations
) -> None:
    admin_page.goto("/admin/destinations/application/add/")

    # The admin's prepopulate script fills the slug from the name: it runs only
    # if the policy let the admin's scripts and their nonce-carrying data load.
    admin_page.get_by_label("Name").fill("Big Shop")
    admin_page.get_by_label("Name").press("Tab")

    expect(admin_page.get_by_label("Slug")).to_have_value("big-shop")
    assert violations.console == []
    assert violations.events() == []


def test_login_page_loads_without_violation(
    page: Page, violations: Violations, django_user_model: type[User]
) -> None:
    django_user_model.objects.create_superuser(
        username=ADMIN_USERNAME, email="admin@example.com", password=ADMIN_PASSWORD
    )

    visit(page, violations, "/admin/login/")
    log_in(page, ADMIN_USERNAME, ADMIN_PASSWORD)

    assert violations.console == []


def test_status_pages_load_without_violation(
    page: Page,
    violations: Violations,
    destination: Destination,
    django_user_model: type[User],
) -> None:
    user = django_user_model.objects.create_user(
        username="developer", password=DEVELOPER_PASSWORD
    )
    destination.application.developers.add(user)
    event = Event.objects.get()

    visit(page, violations, "/accounts/login/")
    page.get_by_label("Username").fill("developer")
    page.get_by_label("Password").fill(DEVELOPER_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/status/**")

    for path in (
        "/status/",
        "/status/shop/TEST/",
        f"/status/shop/TEST/destinations/{destination.pk}/",
        "/status/shop/TEST/events/",
        f"/status/shop/TEST/events/{event.pk}/",
    ):
        visit(page, violations, path)
