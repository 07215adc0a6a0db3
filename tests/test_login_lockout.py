"""Lockout after repeated failed log-ins, on the admin's login and the app
developers' login, per username and per client address."""

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import Client
from django.urls import reverse
from pytest_django import Settings

from portal import login_protection

pytestmark = pytest.mark.django_db

PASSWORD = "pw-lockout-1-tests"
WRONG = "not-the-password"
ADMIN_LOGIN_URL = reverse("admin:login")
DEVELOPER_LOGIN_URL = reverse("login")
LOGIN_URLS = [ADMIN_LOGIN_URL, DEVELOPER_LOGIN_URL]
LOCKED = "Too many failed log-ins"


@pytest.fixture(autouse=True)
def lockout_settings(settings: Settings) -> Iterator[None]:
    settings.LOGIN_FAILURE_LIMIT = 5
    settings.LOGIN_FAILURE_WINDOW = 900
    settings.LOGIN_LOCKOUT_SECONDS = 900
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # The counts live in the process's cache: no other test may see them.
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def staff(django_user_model: type[User]) -> User:
    return django_user_model.objects.create_user(
        username="partner", password=PASSWORD, is_staff=True
    )


def log_in(
    url: str, username: str, password: str, address: str = "192.0.2.10"
) -> tuple[Client, Any]:
    client = Client(REMOTE_ADDR=address)
    response = client.post(url, {"username": username, "password": password})
    return client, response


def fail(url: str, username: str, times: int, address: str = "192.0.2.10") -> Any:
    response = None
    for _ in range(times):
        _, response = log_in(url, username, WRONG, address)
    return response


def signed_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


@pytest.mark.parametrize("url", LOGIN_URLS)
def test_four_failures_do_not_lock(url: str, staff: User) -> None:
    response = fail(url, "partner", 4)

    assert response.status_code == 200
    assert LOCKED not in response.text
    client, response = log_in(url, "partner", PASSWORD)
    assert response.status_code == 302
    assert signed_in(client)


@pytest.mark.parametrize("url", LOGIN_URLS)
def test_fifth_failure_says_when_to_retry(url: str, staff: User) -> None:
    response = fail(url, "partner", 5)

    assert response.status_code == 200
    assert LOCKED in response.text
    assert "for this username" in response.text
    assert "Log-in is blocked until" in response.text
    assert "UTC (in about 15 minutes); try again then." in response.text


@pytest.mark.parametrize("url", LOGIN_URLS)
def test_locked_username_rejects_right_password(url: str, staff: User) -> None:
    fail(url, "partner", 5)

    client, response = log_in(url, "partner", PASSWORD, address="198.51.100.7")

    assert response.status_code == 200
    assert LOCKED in response.text
    assert not signed_in(client)


def test_username_lock_counts_across_addresses(staff: User) -> None:
    for number in range(5):
        fail(ADMIN_LOGIN_URL, "partner", 1, address=f"198.51.100.{number}")

    client, response = log_in(ADMIN_LOGIN_URL, "partner", PASSWORD, "203.0.113.9")

    assert LOCKED in response.text
    assert not signed_in(client)


def test_username_lock_ignores_letter_case(staff: User) -> None:
    fail(ADMIN_LOGIN_URL, "PARTNER", 5, address="198.51.100.1")

    client, response = log_in(ADMIN_LOGIN_URL, "partner", PASSWORD, "203.0.113.9")

    assert LOCKED in response.text
    assert not signed_in(client)


def test_address_lock_covers_every_username(
    staff: User, django_user_model: type[User]
) -> None:
    for number in range(5):
        fail(ADMIN_LOGIN_URL, f"guess-{number}", 1, address="192.0.2.66")

    client, response = log_in(ADMIN_LOGIN_URL, "partner", PASSWORD, "192.0.2.66")

    assert LOCKED in response.text
    assert "for your network address" in response.text
    assert not signed_in(client)


def test_address_lock_leaves_other_addresses(staff: User) -> None:
    for number in range(5):
        fail(ADMIN_LOGIN_URL, f"guess-{number}", 1, address="192.0.2.66")

    client, response = log_in(ADMIN_LOGIN_URL, "partner", PASSWORD, "192.0.2.67")

    assert response.status_code == 302
    assert signed_in(client)


def test_admin_lock_applies_to_developer_login(staff: User) -> None:
    fail(ADMIN_LOGIN_URL, "partner", 5)

    client, response = log_in(DEVELOPER_LOGIN_URL, "partner", PASSWORD, "203.0.113.9")

    assert LOCKED in response.text
    assert not signed_in(client)


def test_lock_ends_after_lockout_period(
    staff: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail(ADMIN_LOGIN_URL, "partner", 5)
    start = login_protection.now()
    monkeypatch.setattr(login_protection, "now", lambda: start + 901)

    client, response = log_in(ADMIN_LOGIN_URL, "partner", PASSWORD)

    assert response.status_code == 302
    assert signed_in(client)


def test_success_resets_username_count(staff: User) -> None:
    fail(ADMIN_LOGIN_URL, "partner", 4, address="198.51.100.1")
    client, _ = log_in(ADMIN_LOGIN_URL, "partner", PASSWORD, "198.51.100.2")
    assert signed_in(client)

    fail(ADMIN_LOGIN_URL, "partner", 4, address="198.51.100.3")
    client, response = log_in(ADMIN_LOGIN_URL, "partner", PASSWORD, "198.51.100.4")

    assert LOCKED not in response.text
    assert signed_in(client)


def test_limit_follows_setting(settings: Settings, staff: User) -> None:
    settings.LOGIN_FAILURE_LIMIT = 2

    response = fail(ADMIN_LOGIN_URL, "partner", 2)

    assert LOCKED in response.text


def test_lock_is_logged_without_password(
    staff: User, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="portal.login_protection")

    fail(ADMIN_LOGIN_URL, "partner", 5, address="192.0.2.10")

    assert "Log-in locked" in caplog.text
    assert "'partner'" in caplog.text
    assert "192.0.2.10" in caplog.text
    assert WRONG not in caplog.text


def test_proxy_address_taken_from_forwarded_for(settings: Settings, rf: Any) -> None:
    settings.BEHIND_PROXY = True
    request = rf.get(
        "/", REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="203.0.113.5, 192.0.2.44"
    )

    assert login_protection.client_address(request) == "192.0.2.44"


def test_forwarded_for_ignored_without_proxy(settings: Settings, rf: Any) -> None:
    settings.BEHIND_PROXY = False
    request = rf.get("/", REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="192.0.2.44")

    assert login_protection.client_address(request) == "10.0.0.2"
