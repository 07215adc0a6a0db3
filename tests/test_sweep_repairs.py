"""Repairs the sweep and the notifier make for races and odd data."""

import pytest
from django.core import mail
from django.utils import timezone

from delivery import health
from delivery.models import DeliveryStatus
from delivery.notifications import notify_contacts

from .delivery_doubles import (
    add_event,
    make_application,
    make_destination,
    queue_delivery,
)

pytestmark = pytest.mark.django_db


def test_sweep_releases_held_of_active_destination() -> None:
    destination = make_destination(make_application())
    event = add_event(destination.application, "e-1", "k", timezone.now())
    held = queue_delivery(destination, event, status=DeliveryStatus.HELD)

    released = health.release_stray_held()

    held.refresh_from_db()
    assert released == 1
    assert held.status == DeliveryStatus.PENDING


def test_sweep_keeps_held_of_paused_destination() -> None:
    destination = make_destination(make_application(), paused_at=timezone.now())
    event = add_event(destination.application, "e-1", "k", timezone.now())
    held = queue_delivery(destination, event, status=DeliveryStatus.HELD)

    released = health.release_stray_held()

    held.refresh_from_db()
    assert released == 0
    assert held.status == DeliveryStatus.HELD


def test_notify_survives_line_break_in_name() -> None:
    application = make_application()
    application.name = "Shop\nInjected: header"
    application.save()
    destination = make_destination(application)

    notify_contacts(destination, "Delivery paused", "body")

    [message] = mail.outbox
    assert message.subject == "[Shop Injected: header PROD] Delivery paused"
