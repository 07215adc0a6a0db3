"""E-mail to an application's contacts when a destination stops receiving events."""

import logging

from django.conf import settings
from django.core.mail import send_mail

from destinations.models import Destination

logger = logging.getLogger(__name__)


def notify_contacts(destination: Destination, subject: str, body: str) -> None:
    """Mail the application's contacts; a mail server error is logged, not raised,
    because the delivery state it reports is already saved."""
    recipients = destination.application.contact_email_list
    if not recipients:
        logger.warning(
            "Destination %s: no contact address to tell %r", destination.pk, subject
        )
        return
    try:
        # A line break in an application's name would make an invalid header.
        name = " ".join(destination.application.name.split())
        send_mail(
            subject=f"[{name} {destination.stage}] {subject}",
            message=body,
            from_email=settings.DEFAULT_FROM_EMAIL,
            recipient_list=recipients,
        )
    except (OSError, ValueError):
        logger.exception(
            "Destination %s: could not send the e-mail %r", destination.pk, subject
        )
