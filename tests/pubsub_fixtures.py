"""Pub/Sub fixtures: the local peer, Google's emulator, topics and stage settings.

`pubsub_peer` runs a test against both the local peer and Google's emulator (Debian
package google-cloud-cli-pubsub-emulator); the emulator's runs are skipped where it is
not installed. `local_pubsub_peer` is for tests that need the peer's failure switch or
limits, which the emulator lacks.
"""

import os
import shutil
import subprocess
import tempfile
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from google.pubsub_v1 import types
from pytest_django import Settings

from delivery.peers.pubsub import (
    PubSubPeer,
    create_subscription,
    create_topic,
    free_port,
    pull_messages,
    start_pubsub_peer,
    stop_process,
    wait_until_ready,
)

PUBSUB_PROJECT = "portal-tests"
TEST_SERVICE_ACCOUNT = "events-test@platform-project.iam.gserviceaccount.com"
EMULATOR_PACKAGE = "google-cloud-cli-pubsub-emulator"
# Where the package puts the launcher, for systems where dpkg cannot list it.
EMULATOR_LAUNCHER = Path(
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
)


@dataclass(frozen=True)
class PubSubTarget:
    """A server under test: "local" (this project's peer) or "official" (Google's
    emulator). `peer` is the local peer's handle, None for the emulator."""

    name: str
    endpoint: str
    peer: PubSubPeer | None = None


@dataclass(frozen=True)
class PubSubTopic:
    """A topic with one pull subscription, on a peer or emulator."""

    endpoint: str
    project: str
    topic_id: str
    path: str
    subscription: str

    def pull(self, count: int, timeout: float = 30.0) -> list[types.PubsubMessage]:
        """Pull and acknowledge `count` messages, in the order they arrive."""
        return pull_messages(self.endpoint, self.subscription, count, timeout=timeout)


def new_topic(endpoint: str, *, ordering: bool = True) -> PubSubTopic:
    """Create a topic with a unique name and a subscription to it at `endpoint`."""
    suffix = uuid.uuid4().hex[:12]
    topic_id = f"orders-{suffix}"
    path = create_topic(endpoint, PUBSUB_PROJECT, topic_id)
    subscription = create_subscription(
        endpoint, path, f"reader-{suffix}", ordering=ordering
    )
    return PubSubTopic(endpoint, PUBSUB_PROJECT, topic_id, path, subscription)


# Google's emulator, the reference the local peer is tested against.


class EmulatorNotInstalledError(RuntimeError):
    """Google's Pub/Sub emulator, or the Java runtime it needs, is missing."""


@dataclass
class OfficialEmulator:
    """A running Google Pub/Sub emulator; `stop()` ends it and removes its folder."""

    host: str
    port: int
    _process: subprocess.Popen[bytes] = field(repr=False)
    _log: IO[bytes] = field(repr=False)
    _data_dir: tempfile.TemporaryDirectory[str] = field(repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        stop_process(self._process)
        self._log.close()
        self._data_dir.cleanup()


def official_emulator_launcher() -> Path:
    """Return the path of Google's emulator launcher, or raise
    EmulatorNotInstalledError saying what is missing."""
    launcher = _launcher_from_dpkg() or EMULATOR_LAUNCHER
    if not launcher.is_file():
        raise EmulatorNotInstalledError(
            f"Google's Pub/Sub emulator is not installed: {launcher} does not exist. "
            f"Install the Debian package {EMULATOR_PACKAGE} to run the tests "
            "against it."
        )
    if shutil.which("java") is None:
        raise EmulatorNotInstalledError(
            "Google's Pub/Sub emulator needs a Java runtime, and java is not on PATH."
        )
    return launcher


def _launcher_from_dpkg() -> Path | None:
    if shutil.which("dpkg") is None:
        return None
    listing = subprocess.run(
        ["dpkg", "-L", EMULATOR_PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in listing.stdout.splitlines():
        if line.endswith("/bin/cloud-pubsub-emulator"):
            return Path(line)
    return None


def start_official_emulator(
    host: str = "127.0.0.1", port: int = 0, timeout: float = 90.0
) -> OfficialEmulator:
    """Start Google's emulator on `host`:`port` with a fresh data folder.

    It listens on an IPv4-mapped IPv6 socket, and returns "Ok" for GET / once ready.
    """
    launcher = official_emulator_launcher()
    if port == 0:
        port = free_port(host)
    data_dir = tempfile.TemporaryDirectory(prefix="pubsub-emulator-")
    environment = {
        **os.environ,
        # The launcher passes these options to the JVM; its temporary files then
        # go with the data folder.
        "CLOUD_PUBSUB_EMULATOR_OPTS": f"-Djava.io.tmpdir={data_dir.name}",
    }
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by OfficialEmulator.stop()
    process = subprocess.Popen(
        [str(launcher), f"--host={host}", f"--port={port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=data_dir.name,
        env=environment,
    )
    emulator = OfficialEmulator(
        host=host, port=port, _process=process, _log=log, _data_dir=data_dir
    )
    wait_until_ready(
        "Google's Pub/Sub emulator",
        process,
        log,
        lambda: _answers_ok(host, port),
        timeout,
        on_failure=emulator.stop,
    )
    return emulator


def _answers_ok(host: str, port: int) -> bool:
    # No proxy handler, so an http_proxy variable cannot send the probe elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{host}:{port}/", timeout=2) as response:
            return bool(response.read().strip() == b"Ok")
    except OSError:
        return False


@pytest.fixture(scope="session")
def pubsub_local_server() -> Iterator[PubSubPeer]:
    """The local peer on 127.0.0.1, for the whole run; tests use unique topics."""
    peer = start_pubsub_peer("127.0.0.1", 0)
    yield peer
    peer.stop()


@pytest.fixture(scope="session")
def pubsub_official_server() -> Iterator[OfficialEmulator]:
    """Google's emulator on 127.0.0.1, for the whole run, or a skip saying why not."""
    try:
        emulator = start_official_emulator("127.0.0.1", 0)
    except EmulatorNotInstalledError as error:
        pytest.skip(str(error))
    yield emulator
    emulator.stop()


@pytest.fixture
def local_pubsub_peer(pubsub_local_server: PubSubPeer) -> Iterator[PubSubPeer]:
    """The local peer; failures a test injected and did not use are dropped after."""
    yield pubsub_local_server
    assert pubsub_local_server.state is not None
    pubsub_local_server.state.clear_failures()


@pytest.fixture(params=["local", "official"])
def pubsub_peer(request: pytest.FixtureRequest) -> PubSubTarget:
    """The local peer, then Google's emulator."""
    if request.param == "local":
        peer: PubSubPeer = request.getfixturevalue("local_pubsub_peer")
        return PubSubTarget("local", peer.endpoint, peer)
    emulator: OfficialEmulator = request.getfixturevalue("pubsub_official_server")
    return PubSubTarget("official", emulator.endpoint)


@pytest.fixture
def pubsub_stage(settings: Settings) -> Callable[..., None]:
    """Return a function that points both stages' Pub/Sub publishes at a peer.

    Keyword arguments override the TEST stage's other Google settings.
    """

    def point(endpoint: str, **test_overrides: str) -> None:
        identities = {
            stage: dict(values) for stage, values in settings.STAGE_IDENTITIES.items()
        }
        for stage, values in identities.items():
            values["pubsub_emulator_host"] = endpoint
            values["gcp_credentials_file"] = ""
            values["gcp_service_account"] = (
                TEST_SERVICE_ACCOUNT if stage == "TEST" else ""
            )
        identities["TEST"].update(test_overrides)
        settings.STAGE_IDENTITIES = identities

    return point
