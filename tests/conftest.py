"""Fixtures shared by every test module: the encryption key, an SQS peer, the
Celery broker and a real Celery worker process."""

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
from django.conf import settings as django_settings
from pytest_django import Settings

from delivery.peers.pubsub import PubSubPeer
from delivery.peers.pubsub import peer_environment as pubsub_peer_environment
from delivery.peers.sqs import (
    FAKE_ACCESS_KEY_ID,
    FAKE_SECRET_ACCESS_KEY,
    SqsPeer,
    aws_queue_url,
    create_queue,
    peer_environment,
    sqs_client,
    start_sqs_peer,
)
from portal.celery import app as celery_app

if TYPE_CHECKING:
    from delivery.models import Delivery

pytest_plugins = [
    "tests.pubsub_fixtures",
    "tests.servicebus_fixtures",
    "tests.system_fixtures",
]

# A fixed Fernet key, used only by the tests, so encrypted columns can be written and
# read back. The worker process started by the tests gets the same key.
TEST_ENCRYPTION_KEY = "8GCXAkX7PI-K05I1xX3OZBdoTOG82LI8KFR11SB4MrU="
WORKER_START_SECONDS = 60.0
DELIVERY_WAIT_SECONDS = 60.0
# AWS variables of the developer's shell that could steer a client elsewhere.
AWS_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)

_reports = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Kept so that a fixture's teardown can tell whether its test failed.
    report = yield
    item.stash.setdefault(_reports, {})[report.when] = report
    return report


def _failed(node: pytest.Item) -> bool:
    return any(report.failed for report in node.stash.get(_reports, {}).values())


@pytest.fixture(scope="session")
def django_db_modify_db_settings(
    django_db_modify_db_settings_parallel_suffix: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Put the SQLite test database in this run's temporary folder.

    pytest-django deletes the file at the start and end of a run, so two runs in one
    checkout sharing var/test.sqlite3 would delete each other's database.
    """
    database = django_settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        path = tmp_path_factory.mktemp("database") / "test.sqlite3"
        database.setdefault("TEST", {})["NAME"] = str(path)


@pytest.fixture(autouse=True)
def encryption_keys(settings: Settings) -> None:
    settings.ENCRYPTION_KEYS = [TEST_ENCRYPTION_KEY]


@pytest.fixture(scope="session")
def sqs_peer() -> Iterator[SqsPeer]:
    """moto's SQS server on 127.0.0.1, for the whole run. Tests create queues with
    unique names, because moto slows down as its queues fill."""
    peer = start_sqs_peer(host="127.0.0.1", port=0)
    yield peer
    peer.stop()


@pytest.fixture
def sqs_endpoint(settings: Settings, sqs_peer: SqsPeer) -> SqsPeer:
    """Send both stages' SQS calls from this process to the peer."""
    identity = {
        "aws_access_key_id": FAKE_ACCESS_KEY_ID,
        "aws_secret_access_key": FAKE_SECRET_ACCESS_KEY,
        "aws_profile": "",
        "sqs_endpoint_url": sqs_peer.endpoint_url,
    }
    settings.STAGE_IDENTITIES = {"TEST": dict(identity), "PROD": dict(identity)}
    return sqs_peer


@dataclass(frozen=True)
class PeerQueue:
    """A queue on the SQS peer."""

    name: str
    # The AWS form of the queue URL, as a destination stores it.
    url: str
    # The URL the peer reports, for reading the queue back directly.
    peer_url: str
    endpoint_url: str

    @property
    def fifo(self) -> bool:
        return self.name.endswith(".fifo")

    def receive(self) -> list[dict[str, Any]]:
        """Read up to 10 messages with every system and message attribute."""
        response = sqs_client(self.endpoint_url).receive_message(
            QueueUrl=self.peer_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        return list(response.get("Messages", []))

    def set_attributes(self, **attributes: str) -> None:
        sqs_client(self.endpoint_url).set_queue_attributes(
            QueueUrl=self.peer_url, Attributes=attributes
        )


@pytest.fixture
def make_sqs_queue(sqs_peer: SqsPeer) -> Callable[..., PeerQueue]:
    """Return a function that creates a queue with a unique name on the peer."""

    def make(
        prefix: str = "orders", *, fifo: bool = False, max_size: int | None = None
    ) -> PeerQueue:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}" + (".fifo" if fifo else "")
        attributes = {}
        if max_size is not None:
            attributes["MaximumMessageSize"] = str(max_size)
        peer_url = create_queue(sqs_peer.endpoint_url, name, attributes=attributes)
        return PeerQueue(name, aws_queue_url(name), peer_url, sqs_peer.endpoint_url)

    return make


@pytest.fixture(scope="session", autouse=True)
def celery_broker(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Point this process's Celery app at the run's broker and return the
    environment variables that point a worker at the same one.

    CELERY_BROKER_URL from the environment wins (CI uses Redis); otherwise a
    filesystem broker in a fresh folder, so no earlier run's messages are read.
    """
    url = os.environ.get("CELERY_BROKER_URL", "filesystem://")
    environment = {"CELERY_BROKER_URL": url}
    celery_app.conf.update(broker_url=url)
    if url.startswith("filesystem://"):
        folder = tmp_path_factory.mktemp("broker")
        environment["CELERY_FILESYSTEM_BROKER_DIR"] = str(folder)
        celery_app.conf.update(
            broker_transport_options={
                "data_folder_in": str(folder),
                "data_folder_out": str(folder),
                "control_folder": str(folder / "control"),
                "polling_interval": 0.2,
            }
        )
    return environment


def database_url(database: dict[str, Any]) -> str:
    """Return a DATABASE_URL for the database settings `database`."""
    engine = database["ENGINE"]
    if engine == "django.db.backends.sqlite3":
        return f"sqlite:///{database['NAME']}"
    if engine == "django.db.backends.postgresql":
        user = quote(database.get("USER") or "", safe="")
        password = database.get("PASSWORD") or ""
        credentials = f"{user}:{quote(password, safe='')}" if password else user
        host = database.get("HOST") or "127.0.0.1"
        port = database.get("PORT") or 5432
        return f"postgres://{credentials}@{host}:{port}/{database['NAME']}"
    raise RuntimeError(f"The worker fixture cannot pass on database engine {engine}.")


class Worker:
    """A `celery worker` child process and its log file."""

    def __init__(self, command: list[str], environment: dict[str, str], log: Path):
        self.command = command
        self.environment = environment
        self.log_path = log
        self._log = log.open("wb")
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.command,
            cwd=django_settings.BASE_DIR,
            env=self.environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def restart(self, timeout: float = WORKER_START_SECONDS) -> None:
        """Start the process again after `stop()`, appending to the same log."""
        start = self.log_size()
        self._log = self.log_path.open("ab")
        self.process = self._spawn()
        self.wait_until_ready(timeout, start)

    def log(self, start: int = 0) -> str:
        with self.log_path.open("rb") as log:
            log.seek(start)
            return log.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def wait_until_ready(self, timeout: float, start: int = 0) -> None:
        deadline = time.monotonic() + timeout
        # Celery logs "celery@HOST ready." once it consumes from the broker.
        while " ready." not in self.log(start):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"The Celery worker exited with status {self.process.returncode} "
                    f"before it was ready. Its log:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"The Celery worker was not ready after {timeout:g} s. Its log:\n"
                    f"{self.log()}"
                )
            time.sleep(0.1)

    def wait_for_delivery(
        self, delivery_id: int, timeout: float = DELIVERY_WAIT_SECONDS
    ) -> "Delivery":
        """Poll the database until the worker has finished delivery `delivery_id`,
        and return it. Raise AssertionError with the worker's log after `timeout`."""
        from delivery.models import Delivery, DeliveryStatus

        unfinished = (DeliveryStatus.PENDING, DeliveryStatus.SENDING)
        deadline = time.monotonic() + timeout
        delivery = Delivery.objects.get(pk=delivery_id)
        while delivery.status in unfinished:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"Delivery {delivery_id} is still {delivery.status} (worker exit "
                    f"status {self.process.poll()}). The worker's log:\n{self.log()}"
                )
            time.sleep(0.1)
            delivery.refresh_from_db()
        return delivery

    def stop(self) -> None:
        # SIGTERM is Celery's warm shutdown: it finishes the task in hand first.
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def celery_worker(
    django_db_setup: None,
    sqs_peer: SqsPeer,
    pubsub_local_server: PubSubPeer,
    celery_broker: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Worker]:
    """A real `celery worker` process on the test database, the run's broker, the SQS
    peer and the Pub/Sub peer. Service Bus destinations carry their peer's address in
    their connection string. The worker reads only committed rows, so tests that use
    it need `@pytest.mark.django_db(transaction=True)`."""
    environment = {
        name: value for name, value in os.environ.items() if name not in AWS_VARIABLES
    }
    environment.update(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            # The developer's .env must not override what the tests pass.
            "ENV_FILE": "",
            "DATABASE_URL": database_url(django_settings.DATABASES["default"]),
            "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
            "SQS_TIMEOUT": "5",
            "PUBSUB_TIMEOUT": "5",
            "SERVICEBUS_TIMEOUT": "5",
            "SWEEP_INTERVAL": "1",
            "LOG_LEVEL": "INFO",
            **celery_broker,
            **peer_environment(sqs_peer.endpoint_url),
            **pubsub_peer_environment(pubsub_local_server.endpoint),
        }
    )
    command = [
        str(Path(sys.executable).parent / "celery"),
        "-A",
        "portal",
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "-l",
        "info",
        "-n",
        f"tests-{os.getpid()}@127.0.0.1",
        # Celery beat inside the worker runs the sweep that re-wakes workers and
        # reclaims deliveries whose worker vanished.
        "--beat",
        "--schedule",
        str(tmp_path_factory.mktemp("beat") / "schedule"),
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]

    # A Redis broker outlives test runs: drop what an interrupted run left queued.
    celery_app.control.purge()
    worker = Worker(command, environment, tmp_path_factory.mktemp("worker") / "log")
    try:
        worker.wait_until_ready(WORKER_START_SECONDS)
        yield worker
    finally:
        worker.stop()
        if worker.process.returncode not in (0, None):
            print(f"The Celery worker exited with status {worker.process.returncode}.")
            print(worker.log())


@pytest.fixture
def worker(celery_worker: Worker, request: pytest.FixtureRequest) -> Iterator[Worker]:
    """The session's Celery worker; when the test fails, its log lines from the test
    are printed."""
    start = celery_worker.log_size()
    yield celery_worker
    if _failed(request.node):
        print(f"The Celery worker's log during {request.node.name}:")
        print(celery_worker.log(start))
