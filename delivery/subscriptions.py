"""E-mail to the app developers who asked to hear when a destination's health
changes: it starts failing, is paused or disabled, or recovers.

The application's contact addresses are mailed by `notifications` as before; this
adds the app developers' own choices, kept in NotificationPreference.
"""

import logging
from enum import StrEnum
from functools import partial

from django.conf import settings
from django.core.mail import send_mass_mail
from django.db import transaction

from destinations.models import Destination

from .models import NotificationPreference

logger = logging.getLogger(__name__)


class Change(StrEnum):
    """A change of a destination's health. Each value is the NotificationPreference
    field that subscribes to it."""

    FAILING = "on_failing"
    PAUSED = "on_paused"
    DISABLED = "on_disabled"
    RECOVERED = "on_recovered"


SUBJECTS = {
    Change.FAILING: "Delivery is failing",
    Change.PAUSED: "Delivery paused",
    Change.DISABLED: "Destination disabled",
    Change.RECOVERED: "Delivery recovered",
}


def notify(destination: Destination, change: Change, detail: str) -> None:
    """Mail the subscribers of `change` once the caller's transaction commits, so a
    rolled-back state change sends nothing."""
    transaction.on_commit(partial(send_notifications, destination.pk, change, detail))


def recipients(destination: Destination, change: Change) -> list[str]:
    """Return the addresses of the active app developers of the destination's
    application who chose to hear about `change`.

    A preference outlives the user's membership, so membership is checked here:
    someone removed from the application is not mailed about it any more.
    """
    preferences = NotificationPreference.objects.filter(
        application_id=destination.application_id,
        user__is_active=True,
        user__applications=destination.application_id,
        **{change.value: True},
    ).exclude(user__email="")
    addresses = preferences.values_list("user__email", flat=True).distinct()
    return sorted(addresses)


def send_notifications(destination_id: int, change: Change, detail: str) -> int:
    """Send one e-mail per subscriber and return how many were sent. A mail server
    error is logged, not raised, because the state change is already saved."""
    destination = (
        Destination.objects.select_related("application")
        .filter(pk=destination_id)
        .first()
    )
    if destination is None:
        return 0
    addresses = recipients(destination, change)
    if not addresses:
        return 0

    application = destination.application
    # A line break in an application's name would make an invalid header.
    name = " ".join(application.name.split())
    subject = f"[{name} {destination.stage}] {SUBJECTS[change]}"
    body = (
        f"{SUBJECTS[change]}: {destination.name} ({destination.target}).\n\n"
        f"{detail}\n\n"
        "You receive this because you chose it in the delivery status pages of "
        f"{application.name}. Change your choices there under Notifications."
    )
    messages = [
        (subject, body, settings.DEFAULT_FROM_EMAIL, [address]) for address in addresses
    ]
    try:
        sent = send_mass_mail(messages)
    except (OSError, ValueError):
        logger.exception(
            "Destination %s: could not mail %d subscribers about %s",
            destination.pk,
            len(messages),
            change.name,
        )
        return 0
    logger.info(
        "Destination %s: mailed %d subscribers about %s",
        destination.pk,
        sent,
        change.name,
    )
    return int(sent)
