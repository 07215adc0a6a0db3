"""A destination's health: pausing, automatic disabling and enabling again.

A destination is paused when a send fails for a reason that is the destination's own
(access denied, missing queue or topic, bad credentials): nothing more is sent to it
and nothing is dropped. It is disabled when every attempt has failed for a long time
or too many attempts failed in a row. Either way, events that arrive meanwhile are
kept as held deliveries and go out, in order, when it is enabled again.
"""

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from destinations.models import Destination

from .models import Delivery, DeliveryStatus
from .notifications import notify_contacts
from .subscriptions import Change, notify
from .transports import Blame, Failure, Result, Sent

logger = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    """The part of one batch's results that concerns the destination itself."""

    successes: int = 0
    failures: int = 0
    last_failure: Failure | None = None
    pause_because: Failure | None = None
    _results: list[Result] = field(default_factory=list, repr=False)

    def add(self, result: Result) -> None:
        self._results.append(result)
        if isinstance(result, Sent):
            self.successes += 1
            return
        # A message the destination can never take (too large) tells nothing about
        # the destination's health.
        if result.permanent and result.blame != Blame.DESTINATION:
            return
        self.failures += 1
        self.last_failure = result
        if result.permanent:
            self.pause_because = result

    def __bool__(self) -> bool:
        return bool(self._results)


def apply(destination: Destination, outcome: BatchOutcome, now: datetime) -> None:
    """Update the destination's counters from a batch, then pause or disable it
    when the batch calls for it. Runs inside the caller's transaction."""
    rows = Destination.objects.filter(pk=destination.pk)
    if outcome.successes and not outcome.failures:
        if _record_success(destination, now):
            notify(destination, Change.RECOVERED, "An event was delivered again.")
        return

    if outcome.successes:
        rows.update(last_success_at=now)
    if outcome.failures and outcome.last_failure is not None:
        rows.update(
            consecutive_failures=F("consecutive_failures") + outcome.failures,
            last_error=f"{outcome.last_failure.kind}: {outcome.last_failure.message}",
        )
        started = rows.filter(failing_since__isnull=True).update(failing_since=now)
        # A pause sends its own notice, so the first failure is not mailed twice.
        if started and outcome.pause_because is None:
            error = f"{outcome.last_failure.kind}: {outcome.last_failure.message}"
            notify(destination, Change.FAILING, f"{error}\n\nThe platform retries.")

    if outcome.pause_because is not None:
        pause(destination, outcome.pause_because.message, now)
    else:
        disable_if_failing(destination, now)


# _record_success in one statement on PostgreSQL. The subquery locks the row first,
# so a concurrent success waits and then reads failing_since as this one left it:
# one of them reports the recovery, not both.
_SUCCESS_SQL = """
    UPDATE destinations_destination d
    SET consecutive_failures = 0, failing_since = NULL, last_success_at = %(now)s
    FROM (
        SELECT id, failing_since FROM destinations_destination
        WHERE id = %(id)s
        FOR UPDATE
    ) AS previous
    WHERE d.id = previous.id
    RETURNING previous.failing_since IS NOT NULL
"""


def _record_success(destination: Destination, now: datetime) -> bool:
    """Reset the destination's failure counters after a batch without failures,
    and return whether it was failing until now."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(_SUCCESS_SQL, {"id": destination.pk, "now": now})
            row = cursor.fetchone()
        return bool(row and row[0])
    rows = Destination.objects.filter(pk=destination.pk)
    recovered = rows.filter(failing_since__isnull=False).update(failing_since=None)
    rows.update(consecutive_failures=0, failing_since=None, last_success_at=now)
    return bool(recovered)


def pause(destination: Destination, reason: str, now: datetime) -> bool:
    """Pause `destination` unless it already is; return whether it was paused now."""
    changed = Destination.objects.filter(
        pk=destination.pk, paused_at__isnull=True
    ).update(paused_at=now, pause_reason=reason)
    if not changed:
        return False

    logger.warning("Paused destination %s: %s", destination.pk, reason)
    body = (
        f"Delivery to {destination.name} ({destination.target}) is paused, because "
        f"the destination rejected an event:\n\n{reason}\n\n"
        "No events are lost: they wait and go out in order once the destination is "
        "fixed and enabled again in the portal."
    )
    transaction.on_commit(
        partial(notify_contacts, destination, "Delivery paused", body)
    )
    notify(destination, Change.PAUSED, body)
    return True


def disable_if_failing(destination: Destination, now: datetime) -> bool:
    """Disable `destination` after sustained failure; return whether it was."""
    current = Destination.objects.get(pk=destination.pk)
    if current.disabled_at is not None or current.failing_since is None:
        return False

    failing_for = now - current.failing_since
    too_long = failing_for >= timedelta(hours=settings.AUTO_DISABLE_AFTER_HOURS)
    too_many = current.consecutive_failures >= settings.AUTO_DISABLE_AFTER_FAILURES
    if not (too_long or too_many):
        return False

    hours = failing_for.total_seconds() / 3600
    reason = (
        f"Every attempt failed for {hours:.1f} hours ({current.consecutive_failures} "
        f"in a row). Last error: {current.last_error}"
    )
    Destination.objects.filter(pk=destination.pk, disabled_at__isnull=True).update(
        enabled=False, disabled_at=now, disabled_reason=reason
    )
    logger.warning("Disabled destination %s: %s", destination.pk, reason)
    body = (
        f"Delivery to {destination.name} ({destination.target}) was disabled.\n\n"
        f"{reason}\n\nEvents that arrive from now on are kept and go out in order "
        "once the destination is fixed and enabled again in the portal."
    )
    transaction.on_commit(
        partial(notify_contacts, destination, "Destination disabled", body)
    )
    notify(destination, Change.DISABLED, body)
    return True


def enable(destination: Destination) -> int:
    """Enable `destination`, clear any pause, and release its held deliveries to be
    sent in order. Return how many held deliveries were released."""
    from .tasks import wake_workers

    now = timezone.now()
    with transaction.atomic():
        rows = Destination.objects.filter(pk=destination.pk)
        rows.update(
            enabled=True,
            paused_at=None,
            pause_reason="",
            disabled_at=None,
            disabled_reason="",
            consecutive_failures=0,
        )
        # Enabling does not fix the destination: it still counts as failing, from
        # now, until an event gets through, which sends the "recovered" e-mail.
        rows.filter(failing_since__isnull=False).update(failing_since=now)
        released = Delivery.objects.filter(
            destination=destination, status=DeliveryStatus.HELD
        ).update(
            status=DeliveryStatus.PENDING,
            next_attempt_at=now,
            scheduled_at=now,
            updated_at=now,
        )
        # Deliveries that waited behind the pause go now, not at their old retry time.
        Delivery.objects.filter(
            destination=destination, status=DeliveryStatus.PENDING
        ).update(next_attempt_at=now)
        transaction.on_commit(wake_workers)
    logger.info(
        "Enabled destination %s; released %d held deliveries", destination.pk, released
    )
    return released


def disable(destination: Destination) -> None:
    """Disable `destination` by hand: it gets no new deliveries until enabled.

    A pause is cleared too. Otherwise a paused destination that staff switched off
    would still collect held deliveries, and its state would still read as paused.
    Its existing held and pending deliveries stay, and go out when it is enabled.
    """
    Destination.objects.filter(pk=destination.pk).update(
        enabled=False,
        paused_at=None,
        pause_reason="",
        disabled_at=None,
        disabled_reason="",
    )


def release_stray_held() -> int:
    """Release held deliveries of destinations that are active, and count them.

    A publish that read a destination as paused just before it was enabled can
    create held deliveries after enable() released the others. Without this they
    would wait forever, and on an ordered destination they would block their keys.
    """
    now = timezone.now()
    released = Delivery.objects.filter(
        status=DeliveryStatus.HELD,
        destination__enabled=True,
        destination__paused_at__isnull=True,
        destination__disabled_at__isnull=True,
    ).update(status=DeliveryStatus.PENDING, next_attempt_at=now, updated_at=now)
    if released:
        logger.warning("Released %d held deliveries of active destinations", released)
    return released


def sweep_failing_destinations() -> int:
    """Disable destinations that have failed long enough, even if no attempt ran
    since, as when retries are hours apart. Return how many were disabled.

    A paused destination stays paused: it makes no attempts, and its contacts
    already received the reason by e-mail, which is more precise than "kept
    failing".
    """
    now = timezone.now()
    cutoff = now - timedelta(hours=settings.AUTO_DISABLE_AFTER_HOURS)
    candidates = Destination.objects.filter(
        disabled_at__isnull=True, failing_since__lte=cutoff, paused_at__isnull=True
    )
    disabled = 0
    for destination in candidates.select_related("application"):
        with transaction.atomic():
            disabled += disable_if_failing(destination, now)
    return disabled
