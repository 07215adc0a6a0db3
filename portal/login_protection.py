"""Lockout after repeated failed log-ins, per username and per client address.

Failures are counted in Django's cache, in a window that starts at the first
failure: LOGIN_FAILURE_LIMIT failures within LOGIN_FAILURE_WINDOW seconds lock that
username, or that address, for LOGIN_LOCKOUT_SECONDS. While locked, the login forms
reject even the right password without checking it. The admin's login and the app
developers' login at accounts/login/ both use the forms below.

The counts live in the "default" cache: with the local-memory cache each process
counts on its own, so production sets CACHE_URL to a shared Redis (portal.W003).
"""

import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.dispatch import receiver
from django.http import HttpRequest

logger = logging.getLogger(__name__)


def now() -> float:
    """Return the current time in seconds since the epoch (a hook for tests)."""
    return time.time()


def client_address(request: HttpRequest | None) -> str:
    """Return the client's IP address: REMOTE_ADDR, or behind a proxy
    (BEHIND_PROXY) the last address in X-Forwarded-For, which the proxy added."""
    if request is None:
        return ""
    if settings.BEHIND_PROXY:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        addresses = [part.strip() for part in forwarded.split(",") if part.strip()]
        if addresses:
            return addresses[-1]
    return str(request.META.get("REMOTE_ADDR", ""))


def _subjects(username: str, address: str) -> list[tuple[str, str]]:
    """Return (kind, cache key part) for each thing a failure counts against."""
    subjects = []
    if username:
        # Hashed so that any text typed as a username makes a valid cache key.
        digest = hashlib.sha256(username.casefold().encode()).hexdigest()[:32]
        subjects.append(("username", digest))
    if address:
        subjects.append(("address", address))
    return subjects


def _lock_key(kind: str, key: str) -> str:
    return f"login-lock:{kind}:{key}"


def _failures_key(kind: str, key: str) -> str:
    return f"login-failures:{kind}:{key}"


def locked_until(username: str, address: str) -> tuple[str, datetime] | None:
    """Return which lock applies ("username" or "address") and when it ends, or
    None when neither the username nor the address is locked."""
    for kind, key in _subjects(username, address):
        until = cache.get(_lock_key(kind, key))
        if until is not None and until > now():
            return kind, datetime.fromtimestamp(until, tz=UTC)
    return None


def record_failure(username: str, address: str) -> None:
    """Count one failed log-in, and lock what reached LOGIN_FAILURE_LIMIT."""
    for kind, key in _subjects(username, address):
        failures_key = _failures_key(kind, key)
        cache.add(failures_key, 0, timeout=settings.LOGIN_FAILURE_WINDOW)
        try:
            count = cache.incr(failures_key)
        except ValueError:
            # The window ended between add() and incr(): this failure starts a new one.
            cache.set(failures_key, 1, timeout=settings.LOGIN_FAILURE_WINDOW)
            count = 1
        if count < settings.LOGIN_FAILURE_LIMIT:
            continue

        until = now() + settings.LOGIN_LOCKOUT_SECONDS
        cache.set(_lock_key(kind, key), until, timeout=settings.LOGIN_LOCKOUT_SECONDS)
        cache.delete(failures_key)
        logger.warning(
            "Log-in locked for %s s after %s failures: username %r, address %s "
            "(locked by %s)",
            settings.LOGIN_LOCKOUT_SECONDS,
            count,
            username,
            address or "unknown",
            kind,
        )


def clear_failures(username: str) -> None:
    """Forget the username's failures after a successful log-in. The address's
    count stays, so one good account cannot reset guessing at others."""
    for kind, key in _subjects(username, ""):
        cache.delete(_failures_key(kind, key))


def lockout_message(kind: str, until: datetime) -> str:
    minutes = max(1, round((until.timestamp() - now()) / 60))
    subject = "this username" if kind == "username" else "your network address"
    return (
        f"Too many failed log-ins for {subject}. Log-in is blocked until "
        f"{until:%H:%M} UTC (in about {minutes} minute{'s' if minutes != 1 else ''}); "
        "try again then."
    )


@receiver(user_login_failed, dispatch_uid="portal.login_protection.failed")
def _on_login_failed(
    sender: Any,
    credentials: dict[str, Any],
    request: HttpRequest | None = None,
    **kwargs: Any,
) -> None:
    username = str(credentials.get("username") or "")
    record_failure(username, client_address(request))


@receiver(user_logged_in, dispatch_uid="portal.login_protection.logged_in")
def _on_logged_in(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any):
    clear_failures(user.get_username())


class LockoutMixin(forms.Form):
    """Rejects a log-in while its username or client address is locked."""

    request: HttpRequest | None

    def clean(self) -> dict[str, Any]:
        username = str(self.cleaned_data.get("username") or "")
        address = client_address(self.request)
        self._reject_if_locked(username, address)
        try:
            super().clean()
        except ValidationError:
            # This failure may have been the one that set the lock, so the message
            # names the lock now instead of on the next try.
            self._reject_if_locked(username, address)
            raise
        return self.cleaned_data

    def _reject_if_locked(self, username: str, address: str) -> None:
        lock = locked_until(username, address)
        if lock is not None:
            raise ValidationError(lockout_message(*lock), code="locked")


class LockoutAuthenticationForm(LockoutMixin, AuthenticationForm):
    """The app developers' login form."""


class LockoutAdminAuthenticationForm(LockoutMixin, AdminAuthenticationForm):
    """The admin's login form, which also rejects accounts that are not staff."""
