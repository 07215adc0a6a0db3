"""Pub/Sub fixtures: the local peer, Google's emulator, topics and stage settings.

`pubsub_peer` runs a test against both the local peer and Google's emulator (Debian
package google-cloud-cli-pubsub-emulator); the emulator's runs are skipped where it is
not installed. `local_pubsub_peer` is for tests that need the peer's failure switch or
limits, which the emulator lacks.
"""

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from google.pubsub_v1 import types
from pytest_django import Settings

from delivery.peers.pubsub import (
    EmulatorNotInstalledError,
    OfficialEmulator,
    PubSubPeer,
    create_subscription,
    create_topic,
    pull_messages,
    start_official_emulator,
    start_pubsub_peer,
)

PUBSUB_PROJECT = "portal-tests"
TEST_SERVICE_ACCOUNT = "events-test@platform-project.iam.gserviceaccount.com"


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
