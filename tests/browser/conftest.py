"""Fixtures for the browser tests: Debian's Chromium driven by Playwright, a live
server on 127.0.0.1 and a staff user logged in through the admin's login form."""

import re
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright
from pytest_django.live_server_helper import LiveServer

# Playwright's own browser download cannot run here, so the tests use the Chromium
# that Debian's `chromium` package installs.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these three, Chromium calls Google's hosts for updates and sync.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Even with those, Chromium 156 looks up update.googleapis.com and
    # accounts.google.com. The tests only open 127.0.0.1, so every other host name
    # resolves to "not found" without a DNS query.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
# Milliseconds one Playwright action, navigation or `expect` may wait before it
# fails.
ACTION_TIMEOUT_MS = 15_000
ARTIFACTS_DIR = Path(settings.BASE_DIR) / "test-artifacts"

ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = "browser-test-password-7"

_reports = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Kept so that the page fixture's teardown can tell whether its test failed.
    report = yield
    item.stash.setdefault(_reports, {})[report.when] = report
    return report


def _failed(node: pytest.Item) -> bool:
    return any(report.failed for report in node.stash.get(_reports, {}).values())


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    """pytest-django's live server, bound to 127.0.0.1 instead of localhost."""
    server = LiveServer("127.0.0.1:0")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        # Playwright's sync API keeps its asyncio loop running in this thread, so
        # Django would reject every ORM call of the tests as made from async code.
        # The loop only waits while a test runs, so the ORM's blocking calls are safe.
        monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_playwright() as instance:
            yield instance


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """Debian's Chromium, headless, for the whole run."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing. The browser tests need Debian's chromium "
            "package: run bin/test, which installs it, or `apt-get install "
            "chromium`. Playwright's own browser download is not used."
        )
    expect.set_options(timeout=ACTION_TIMEOUT_MS)
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
    )
    yield browser
    browser.close()


@pytest.fixture
def page(
    browser: Browser, live_server: LiveServer, request: pytest.FixtureRequest
) -> Iterator[Page]:
    """A page in a fresh browser context on the live server. When the test fails, a
    screenshot of the page is saved under test-artifacts/."""
    context = browser.new_context(
        base_url=live_server.url, viewport={"width": 1400, "height": 900}
    )
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    page = context.new_page()
    yield page

    if _failed(request.node):
        ARTIFACTS_DIR.mkdir(exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
        screenshot = ARTIFACTS_DIR / f"{name}.png"
        page.screenshot(path=screenshot, full_page=True)
        print(f"Screenshot of {page.url} at the failure: {screenshot}")
    context.close()


def log_in(page: Page, username: str, password: str) -> None:
    """Log in through the admin's login form, as a person would."""
    page.goto("/admin/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/admin/")


@pytest.fixture
def admin_page(page: Page, django_user_model: type[User]) -> Page:
    """`page`, logged in to the admin as a superuser created for the test."""
    django_user_model.objects.create_superuser(
        username=ADMIN_USERNAME, email="admin@example.com", password=ADMIN_PASSWORD
    )
    log_in(page, ADMIN_USERNAME, ADMIN_PASSWORD)
    return page
