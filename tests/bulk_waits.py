"""Waiting for a bulk job that the test's Celery worker runs."""

import time
from typing import TYPE_CHECKING

from delivery import bulk
from delivery.models import BulkJob

if TYPE_CHECKING:
    from .conftest import Worker

JOB_WAIT_SECONDS = 120.0


def wait_for_job(
    worker: "Worker", job_id: int, timeout: float = JOB_WAIT_SECONDS
) -> bulk.Progress:
    """Poll until the worker finished job `job_id` and, for test events, every
    test delivery has its outcome; return the job's progress. Raise
    AssertionError with the worker's log after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        progress = bulk.progress(BulkJob.objects.get(pk=job_id))
        if not progress.running:
            return progress
        if worker.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"Bulk job {job_id} is still running: {progress.job.done} of "
                f"{progress.job.total} done, {progress.waiting} deliveries waiting. "
                f"The worker's log:\n{worker.log()}"
            )
        time.sleep(0.2)
