"""The staff admin at scale: list pages and bulk actions over 5,000 destinations and
1,000,000 deliveries.

    .venv/bin/python -m bench.admin_scale [--destinations 5000] [--deliveries 1000000]
        [--runs 7] [--bulk-size 500] [--reuse]

It drops and recreates the PostgreSQL database bench_admin on 127.0.0.1, migrates it
and fills it with COPY, and reports the fill time. Then it measures, through Django's
test client logged in as a superuser, each admin page's query count and median time
and each bulk action's request. The bulk job's background work is timed on its own,
run in this process as the worker would run it. Targets: at most 15 queries and
300 ms per page and per action request. `--reuse` keeps the filled database of an
earlier run. Figures go to stdout and to var/bench/admin_scale-<timestamp>.json;
docs/benchmarks.md records a run.
"""

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

DATABASE = "bench_admin"
SERVER = "postgres://postgres@127.0.0.1:5432"
# A key for this benchmark's throwaway database only.
BENCH_ENCRYPTION_KEY = "Wm9yZ2VuLWJlbmNoLWtleS1ub3QtYS1zZWNyZXQtMDE="
MAX_QUERIES = 15
MAX_MS = 300.0
DESTINATIONS_PER_APPLICATION = 10
HISTORY = timedelta(days=30)


def configure() -> None:
    """Point Django at the benchmark's database before it is set up."""
    os.environ["ENV_FILE"] = ""
    os.environ["DATABASE_URL"] = f"{SERVER}/{DATABASE}"
    os.environ["ENCRYPTION_KEYS"] = BENCH_ENCRYPTION_KEY
    # Tasks queued by the actions go nowhere: this program runs the jobs itself.
    os.environ["CELERY_BROKER_URL"] = "memory://127.0.0.1//"
    os.environ["LOG_LEVEL"] = "WARNING"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")


def recreate_database() -> None:
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        connection.execute(f"CREATE DATABASE {DATABASE}")


# Filling.


def timed(label: str, timings: dict[str, float]) -> Callable[..., Any]:
    def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = function(*args, **kwargs)
            timings[label] = time.perf_counter() - start
            print(f"  {label}: {timings[label]:.1f} s", flush=True)
            return result

        return run

    return wrap


def make_destinations(count: int, rng: random.Random) -> list[Any]:
    """Applications of ten destinations each (five per stage), of mixed kinds and
    states; Service Bus ones carry an encrypted connection string."""
    from django.utils import timezone

    from destinations import encryption
    from destinations.models import Application, Destination, Kind, Stage

    applications = Application.objects.bulk_create(
        Application(name=f"Application {number:04d}", slug=f"app-{number:04d}")
        for number in range((count + 9) // DESTINATIONS_PER_APPLICATION)
    )
    now = timezone.now()
    rows = []
    for number in range(count):
        application = applications[number // DESTINATIONS_PER_APPLICATION]
        stage = Stage.TEST if number % 10 < 5 else Stage.PROD
        kind = rng.choices(
            [Kind.SQS, Kind.PUBSUB, Kind.SERVICEBUS], weights=[60, 25, 15]
        )[0]
        destination = Destination(
            application=application,
            stage=stage,
            kind=kind,
            name=f"{application.slug} {stage} {number % 5}",
        )
        if kind == Kind.SQS:
            fifo = number % 3 == 0
            suffix = ".fifo" if fifo else ""
            destination.sqs_queue_url = (
                "https://sqs.eu-west-1.amazonaws.com/123456789012/"
                f"events-{number}{suffix}"
            )
            destination.sqs_fifo = fifo
        elif kind == Kind.PUBSUB:
            destination.pubsub_project_id = f"partner-{number}"
            destination.pubsub_topic_id = "events"
        else:
            namespace = f"partner-{number}.servicebus.windows.net"
            destination.servicebus_connection_string = encryption.encrypt(
                f"Endpoint=sb://{namespace}/;SharedAccessKeyName=send;"
                f"SharedAccessKey=bench-key-{number}"
            )
            destination.servicebus_namespace = namespace
            destination.servicebus_key_name = "send"
            destination.servicebus_entity_name = "events"
        state = rng.random()
        if state < 0.02:
            destination.paused_at = now - timedelta(hours=3)
            destination.pause_reason = "access_denied: The queue denied SendMessage."
            destination.last_error = destination.pause_reason
        elif state < 0.03:
            destination.disabled_at = now - timedelta(days=1)
            destination.disabled_reason = "Every attempt failed for 72 hours."
            destination.last_error = "throttled: The queue throttled the request."
        elif state < 0.05:
            destination.enabled = False
        rows.append(destination)
    return Destination.objects.bulk_create(rows, batch_size=1000)


@dataclass
class Outcomes:
    """The status and attempts of one delivery: (offset seconds, outcome, kind)."""

    status: str
    attempts: list[tuple[float, str, str]]


def outcome_of(rng: random.Random) -> Outcomes:
    draw = rng.random()
    if draw < 0.85:
        return Outcomes("delivered", [(0.2, "success", "")])
    if draw < 0.94:
        return Outcomes(
            "delivered", [(0.2, "transient_error", "throttled"), (6, "success", "")]
        )
    if draw < 0.97:
        return Outcomes(
            "failed",
            [
                (0.2, "transient_error", "throttled"),
                (6, "permanent_error", "too_large"),
            ],
        )
    if draw < 0.985:
        return Outcomes("pending", [(0.2, "transient_error", "throttled")])
    return Outcomes("held", [(0.2, "permanent_error", "access_denied")])


def copy_rows(
    table: str, columns: tuple[str, ...], rows: Iterator[tuple[Any, ...]]
) -> int:
    """COPY `rows` into `table`; Django keeps its connection in autocommit mode,
    so each COPY commits by itself."""
    from django.db import connection

    count = 0
    connection.ensure_connection()
    statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
    with connection.connection.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


def fill_history(
    destinations: list[Any], deliveries: int, rng: random.Random
) -> dict[str, int]:
    """Record events of the last 30 days, each delivered to the five destinations
    of its application and stage, with their attempts. Each destination also gets
    one delivered test event."""
    from django.utils import timezone

    now = timezone.now()
    groups: dict[tuple[int, str], list[Any]] = {}
    for destination in destinations:
        key = (destination.application_id, destination.stage)
        groups.setdefault(key, []).append(destination)
    keys = list(groups)
    event_rows: list[tuple[Any, ...]] = []
    delivery_rows: list[tuple[Any, ...]] = []
    attempt_rows: list[tuple[Any, ...]] = []

    delivery_id = 0
    number = 0
    while delivery_id < deliveries:
        application_id, stage = keys[number % len(keys)]
        when = now - HISTORY * rng.random()
        event_id = f"bench{number:021d}"
        object_key = f"4102/order/{rng.randrange(50_000)}"
        event_rows.append(
            (
                event_id,
                application_id,
                stage,
                "ORDER_CREATED",
                object_key,
                when,
                '{"order": 1}',
                "",
                False,
                when,
            )
        )
        for destination in groups[(application_id, stage)]:
            if delivery_id >= deliveries:
                break
            delivery_id += 1
            outcome = outcome_of(rng)
            ordering_key = object_key if destination.is_ordered else ""
            last = when + timedelta(seconds=outcome.attempts[-1][0])
            delivery_rows.append(
                (
                    delivery_id,
                    event_id,
                    destination.pk,
                    outcome.status,
                    ordering_key,
                    when,
                    False,
                    len(outcome.attempts),
                    last + timedelta(minutes=5)
                    if outcome.status == "pending"
                    else None,
                    when,
                    "",
                    when,
                    last,
                )
            )
            for offset, result, kind in outcome.attempts:
                attempt_rows.append(
                    (
                        delivery_id,
                        destination.pk,
                        False,
                        when + timedelta(seconds=offset),
                        rng.randrange(5, 80),
                        result,
                        kind,
                        f"{kind}: see the destination's settings." if kind else "",
                        f"m-{delivery_id}" if result == "success" else "",
                    )
                )
        number += 1

    for destination in destinations:
        delivery_id += 1
        when = now - timedelta(hours=rng.randrange(1, 240))
        event_id = f"test{destination.pk:022d}"
        event_rows.append(
            (
                event_id,
                destination.application_id,
                destination.stage,
                "PORTAL_TEST",
                f"test/{destination.pk}",
                when,
                "{}",
                "",
                True,
                when,
            )
        )
        delivery_rows.append(
            (
                delivery_id,
                event_id,
                destination.pk,
                "delivered",
                "",
                when,
                True,
                1,
                None,
                when,
                "",
                when,
                when,
            )
        )
        attempt_rows.append(
            (delivery_id, destination.pk, True, when, 30, "success", "", "", "t")
        )

    counts = {
        "events": copy_rows(
            "delivery_event",
            (
                "id",
                "application_id",
                "stage",
                "type",
                "object_key",
                "time",
                "data",
                "envelope_json",
                "is_test",
                "recorded_at",
            ),
            iter(event_rows),
        )
    }
    counts["deliveries"] = copy_rows(
        "delivery_delivery",
        (
            "id",
            "event_id",
            "destination_id",
            "status",
            "ordering_key",
            "event_time",
            "is_test",
            "attempt_count",
            "next_attempt_at",
            "scheduled_at",
            "claimed_by",
            "created_at",
            "updated_at",
        ),
        iter(delivery_rows),
    )
    counts["attempts"] = copy_rows(
        "delivery_attempt",
        (
            "delivery_id",
            "destination_id",
            "is_test",
            "started_at",
            "duration_ms",
            "outcome",
            "error_kind",
            "message",
            "remote_message_id",
        ),
        iter(attempt_rows),
    )
    return counts


def finish_fill() -> None:
    """Move the id sequence past the copied ids and let the planner see the data."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT setval(pg_get_serial_sequence('delivery_delivery', 'id'), "
            "(SELECT max(id) FROM delivery_delivery))"
        )
        cursor.execute("VACUUM ANALYZE")


def fill(destination_count: int, delivery_count: int) -> dict[str, Any]:
    from django.core.management import call_command

    rng = random.Random(20261204)
    timings: dict[str, float] = {}
    print(f"Filling {DATABASE}:", flush=True)
    start = time.perf_counter()
    timed("migrate", timings)(call_command)("migrate", verbosity=0)
    destinations = timed("destinations", timings)(make_destinations)(
        destination_count, rng
    )
    counts = timed("events, deliveries and attempts (COPY)", timings)(fill_history)(
        destinations, delivery_count, rng
    )
    timed("VACUUM ANALYZE", timings)(finish_fill)()
    total = time.perf_counter() - start
    print(f"  total: {total:.1f} s", flush=True)
    return {
        "destinations": len(destinations),
        **counts,
        "seconds": {**timings, "total": total},
    }


# Measuring.


@dataclass
class Measure:
    name: str
    url: str
    queries: int
    median_ms: float
    runs: int
    # For bulk actions: the job's work, run as the worker would.
    background_s: float | None = None

    @property
    def passed(self) -> bool:
        return self.queries <= MAX_QUERIES and self.median_ms <= MAX_MS


def request(client: Any, method: str, url: str, data: Any = None) -> tuple[Any, int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        response = getattr(client, method)(url, data)
        if response.streaming:
            b"".join(response.streaming_content)
        else:
            response.content  # noqa: B018 - renders the page inside the timing
    if response.status_code not in (200, 302):
        raise RuntimeError(f"{method.upper()} {url} returned {response.status_code}")
    return response, len(queries)


def measure_page(client: Any, name: str, url: str, runs: int) -> Measure:
    request(client, "get", url)
    times, counts = [], []
    for _ in range(runs):
        start = time.perf_counter()
        _, count = request(client, "get", url)
        times.append((time.perf_counter() - start) * 1000)
        counts.append(count)
    return Measure(name, url, max(counts), statistics.median(times), runs)


def measure_action(
    client: Any, name: str, action: str, ids: list[int], runs: int
) -> Measure:
    from delivery import bulk
    from delivery.models import BulkJob

    url = "/admin/destinations/destination/"
    data = {"action": action, "_selected_action": [str(pk) for pk in ids]}
    times, counts, work = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        response, count = request(client, "post", url, data)
        times.append((time.perf_counter() - start) * 1000)
        counts.append(count)
        job = BulkJob.objects.latest("created_at")
        if response["Location"] != f"/admin/delivery/bulkjob/{job.pk}/change/":
            raise RuntimeError(f"{action} did not lead to its job's page")
        start = time.perf_counter()
        bulk.run(job.pk)
        work.append(time.perf_counter() - start)
    return Measure(
        name,
        f"POST {url} ({len(ids)} destinations)",
        max(counts),
        statistics.median(times),
        runs,
        statistics.median(work),
    )


def measure_all(runs: int, bulk_size: int) -> tuple[list[Measure], dict[str, float]]:
    from django.contrib.auth.models import User
    from django.test import Client

    from delivery.models import Event
    from destinations.models import Destination

    user, _ = User.objects.get_or_create(
        username="bench", defaults={"is_staff": True, "is_superuser": True}
    )
    # Not setup_test_environment(): its template instrumentation would slow every
    # render. The client's host is one that ALLOWED_HOSTS lists by default.
    client = Client(SERVER_NAME="127.0.0.1")
    client.force_login(user)
    event_id = Event.objects.filter(is_test=False).values_list("id", flat=True)[1000]
    destinations = "/admin/destinations/destination/"
    deliveries = "/admin/delivery/delivery/"
    events = "/admin/delivery/event/"
    pages = [
        ("Destinations, first page", destinations),
        ("Destinations, filtered", f"{destinations}?kind__exact=sqs&stage__exact=PROD"),
        ("Destinations, paused", f"{destinations}?state=paused"),
        ("Destinations, search", f"{destinations}?q=app-0042"),
        ("Destinations, page 20", f"{destinations}?p=20"),
        ("Deliveries, first page", deliveries),
        ("Deliveries, failed", f"{deliveries}?status__exact=failed"),
        ("Deliveries, search by event", f"{deliveries}?q={event_id}"),
        ("Deliveries, page 500", f"{deliveries}?p=500"),
        ("Events, first page", events),
        ("Events, test events", f"{events}?is_test__exact=1"),
    ]
    results = []
    for name, url in pages:
        results.append(measure_page(client, name, url, runs))
        print(format_row(results[-1]), flush=True)

    ids = list(
        Destination.objects.filter(enabled=True)
        .order_by("pk")
        .values_list("pk", flat=True)[:bulk_size]
    )
    for name, action, action_runs in [
        ("Send test event", "send_test_events", 3),
        ("Retry failed deliveries", "retry_failed_deliveries", 1),
    ]:
        results.append(measure_action(client, name, action, ids, action_runs))
        print(format_row(results[-1]), flush=True)

    export = {"action": "export_csv", "select_across": "1", "index": "0"}
    export["_selected_action"] = str(ids[0])
    start = time.perf_counter()
    _, count = request(client, "post", destinations, export)
    export_ms = (time.perf_counter() - start) * 1000
    # Not a page: it streams every destination, so the page targets do not apply.
    print(
        f"  CSV export of every destination: {export_ms:.0f} ms, {count} queries",
        flush=True,
    )
    return results, {"ms": export_ms, "queries": count}


def format_row(measure: Measure) -> str:
    verdict = "PASS" if measure.passed else "FAIL"
    background = (
        f", background {measure.background_s:.2f} s"
        if measure.background_s is not None
        else ""
    )
    return (
        f"  {verdict} {measure.name}: {measure.queries} queries, "
        f"{measure.median_ms:.0f} ms median of {measure.runs}{background}"
    )


def machine() -> dict[str, Any]:
    from django.db import connection

    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as info:
        ram_kb = int(info.readline().split()[1])
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        version = cursor.fetchone()[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram_kb / 1024 / 1024, 1),
        "postgresql": version,
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--destinations", type=int, default=5000)
    parser.add_argument("--deliveries", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--bulk-size", type=int, default=500)
    parser.add_argument(
        "--reuse", action="store_true", help="keep the database of an earlier run"
    )
    arguments = parser.parse_args()

    configure()
    if not arguments.reuse:
        recreate_database()
    import django

    django.setup()
    filled = None
    if not arguments.reuse:
        filled = fill(arguments.destinations, arguments.deliveries)

    print("Measuring (median of each page's runs after one warm-up):", flush=True)
    results, export = measure_all(arguments.runs, arguments.bulk_size)
    failed = [result.name for result in results if not result.passed]
    print("FAIL: " + ", ".join(failed) if failed else "PASS: every target met")

    from django.conf import settings

    report = {
        "machine": machine(),
        "fill": filled,
        "targets": {"queries": MAX_QUERIES, "median_ms": MAX_MS},
        "results": [asdict(result) | {"passed": result.passed} for result in results],
        "csv_export": export,
    }
    folder = Path(settings.BASE_DIR) / "var" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = folder / f"admin_scale-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"Figures written to {path}")


if __name__ == "__main__":
    main()
