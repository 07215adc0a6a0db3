"""When to try a failed delivery again: exponential backoff with jitter."""

import random
from datetime import datetime, timedelta

from destinations.models import Destination


def retry_delay(
    destination: Destination, attempt_count: int, rng: random.Random | None = None
) -> timedelta:
    """Return the wait before attempt `attempt_count + 1`.

    The base doubles from the destination's first delay up to its longest delay. The
    wait is drawn between half the base and the base ("equal jitter"), so deliveries
    that failed together do not all come back in the same second.
    """
    rng = rng or random.Random()
    exponent = max(attempt_count - 1, 0)
    # Cap the exponent before raising 2 to it: 2**40 seconds is already centuries.
    base = min(
        destination.retry_max_delay,
        destination.retry_initial_delay * 2 ** min(exponent, 40),
    )
    return timedelta(seconds=base / 2 + rng.uniform(0, base / 2))


def retry_deadline(destination: Destination, scheduled_at: datetime) -> datetime:
    """Return when a delivery queued at `scheduled_at` stops being retried."""
    return scheduled_at + timedelta(hours=destination.retry_window)
