"""Celery tasks: thin wrappers that carry ids only and leave the work to the engine."""

from celery import shared_task

from . import engine


# acks_late: a worker that dies mid-send leaves the message on the broker to be
# delivered again, and the engine's claim makes a second run harmless.
@shared_task(acks_late=True, ignore_result=True)
def send_delivery(delivery_id: int) -> None:
    """Send one delivery and record the attempt."""
    engine.deliver(delivery_id)
