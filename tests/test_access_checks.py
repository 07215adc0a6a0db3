"""Check access: each transport's side-effect-free check against the local peers, and
the admin's "Check access" button."""

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import EndpointConnectionError
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse
from pytest_django import Settings

from delivery.peers.pubsub import PubSubPeer, create_topic
from delivery.peers.servicebus import ServiceBusPeer, generate_key
from delivery.peers.sqs import (
    DEFAULT_REGION,
    FAKE_ACCESS_KEY_ID,
    FAKE_SECRET_ACCESS_KEY,
    SqsPeer,
    aws_queue_url,
    create_queue,
    free_port,
    sqs_client,
)
from delivery.transports import OutgoingMessage, Result, Transport, transport_for
from delivery.transports import sqs as sqs_transport
from delivery.transports.base import CheckResult
from destinations.models import Application, Destination, Kind, SqsEncryption, Stage

from .pubsub_fixtures import PUBSUB_PROJECT, TEST_SERVICE_ACCOUNT, OfficialEmulator
from .servicebus_fixtures import MakeServiceBusDestination

pytestmark = pytest.mark.django_db

KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
OTHER_KEY_ID = "0987dcba-09ba-87dc-65fe-0987654321ba"
KEY_ARN = f"arn:aws:kms:{DEFAULT_REGION}:123456789012:key/{KEY_ID}"
REGIONAL_ENDPOINT = "europe-west1-pubsub.googleapis.com:443"
PUBLISH = "pubsub.topics.publish"


@pytest.fixture
def application() -> Application:
    return Application.objects.create(name="Orders", slug="orders")


def run_check(destination: Destination) -> CheckResult:
    transport = transport_for(destination)
    assert transport is not None
    return transport.check()


# SQS.


@dataclass(frozen=True)
class Queue:
    name: str
    peer_url: str


@pytest.fixture
def make_queue(sqs_endpoint: SqsPeer) -> Callable[..., Queue]:
    """Return a function that creates a uniquely named queue on the SQS peer.

    moto turns SqsManagedSseEnabled on for every queue created without it.
    """

    def make(fifo: bool = False, **attributes: str) -> Queue:
        name = f"checked-{uuid.uuid4().hex[:12]}" + (".fifo" if fifo else "")
        peer_url = create_queue(sqs_endpoint.endpoint_url, name, attributes=attributes)
        return Queue(name, peer_url)

    return make


def sqs_destination(
    application: Application,
    queue_name: str,
    *,
    encryption: str = SqsEncryption.NONE,
    kms_key_arn: str = "",
) -> Destination:
    return Destination.objects.create(
        application=application,
        stage=Stage.TEST,
        kind=Kind.SQS,
        name=f"queue {queue_name}",
        sqs_queue_url=aws_queue_url(queue_name),
        sqs_fifo=queue_name.endswith(".fifo"),
        sqs_encryption=encryption,
        sqs_kms_key_arn=kms_key_arn,
    )


def test_sqs_check_matching_queue_is_ok(
    application: Application, make_queue: Callable[..., Queue]
) -> None:
    queue = make_queue(MaximumMessageSize="262144", SqsManagedSseEnabled="false")
    destination = sqs_destination(application, queue.name)

    result = run_check(destination)

    assert result.ok is True
    assert result.failure is None
    assert result.mismatches == []
    assert "MaximumMessageSize is 262,144 bytes." in result.findings
    assert "FifoQueue is false." in result.findings
    assert any("no server-side encryption" in line for line in result.findings)


def test_sqs_check_sends_nothing(
    application: Application,
    make_queue: Callable[..., Queue],
    sqs_endpoint: SqsPeer,
) -> None:
    queue = make_queue(SqsManagedSseEnabled="false")
    destination = sqs_destination(application, queue.name)

    run_check(destination)

    attributes = sqs_client(sqs_endpoint.endpoint_url).get_queue_attributes(
        QueueUrl=queue.peer_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "0"


def test_sqs_check_flags_kms_key_on_unencrypted_destination(
    application: Application, make_queue: Callable[..., Queue]
) -> None:
    queue = make_queue(KmsMasterKeyId="alias/partner-orders")
    destination = sqs_destination(application, queue.name)

    result = run_check(destination)

    assert result.ok is False
    assert result.failure is None
    [mismatch] = result.mismatches
    assert "Server-side encryption is 'None' here" in mismatch
    assert "KmsMasterKeyId alias/partner-orders" in mismatch
    assert "Choose SSE-KMS" in mismatch
    assert "KmsMasterKeyId is alias/partner-orders." in result.findings


def test_sqs_check_flags_sse_sqs_on_unencrypted_destination(
    application: Application, make_queue: Callable[..., Queue]
) -> None:
    queue = make_queue(SqsManagedSseEnabled="true")
    destination = sqs_destination(application, queue.name)

    result = run_check(destination)

    assert result.ok is False
    [mismatch] = result.mismatches
    assert "SqsManagedSseEnabled is true" in mismatch
    assert "Choose SSE-SQS" in mismatch


def test_sqs_check_flags_unencrypted_queue_for_sse_kms(
    application: Application, make_queue: Callable[..., Queue]
) -> None:
    queue = make_queue(SqsManagedSseEnabled="false")
    destination = sqs_destination(
        application,
        queue.name,
        encryption=SqsEncryption.SSE_KMS,
        kms_key_arn=KEY_ARN,
    )

    result = run_check(destination)

    [mismatch] = result.mismatches
    assert "'SSE-KMS (customer managed KMS key)' here" in mismatch
    assert "no server-side encryption" in mismatch
    assert "Choose None" in mismatch


def test_sqs_check_accepts_key_arn_of_key_id(
    application: Application, make_queue: Callable[..., Queue]
) -> None:
    queue = make_queue(KmsMasterKeyId=KEY_ID)
    destination = sqs_destination(
        application, queue.name, encryption=SqsEncryption.SSE_KMS, kms_key_arn=KEY_ARN
    )

    result = run_check(destination)

    assert result.ok is True
    assert result.mismatches == []
    assert any("kms:GenerateDataKey" in line for line in result.findings)


def test_sqs_check_flags_different_kms_key(
    application: Application, make_queue: Callable[..., Queue]
) -> None:
    queue = make_queue(KmsMasterKeyId=OTHER_KEY_ID)
    destination = sqs_destination(
        application, queue.name, encryption=SqsEncryption.SSE_KMS, kms_key_arn=KEY_ARN
    )

    result = run_check(destination)

    assert result.ok is False
    [mismatch] = result.mismatches
    assert f"KMS key ARN is {KEY_ARN} here" in mismatch
    assert f"KmsMasterKeyId {OTHER_KEY_ID}" in mismatch


def test_sqs_check_alias_against_key_only_noted(
    application: Application, make_queue: Callable[..., Queue]
) -> None:
    queue = make_queue(KmsMasterKeyId="alias/partner-orders")
    destination = sqs_destination(
        application, queue.name, encryption=SqsEncryption.SSE_KMS, kms_key_arn=KEY_ARN
    )

    result = run_check(destination)

    assert result.ok is True
    assert result.mismatches == []
    assert any("cannot confirm" in line for line in result.findings)


def test_sqs_check_flags_aws_managed_key(
    application: Application, make_queue: Callable[..., Queue]
) -> None:
    queue = make_queue(KmsMasterKeyId="alias/aws/sqs")
    destination = sqs_destination(
        application, queue.name, encryption=SqsEncryption.SSE_KMS
    )

    result = run_check(destination)

    assert result.ok is False
    [mismatch] = result.mismatches
    assert "cannot be used across accounts" in mismatch
    assert any("has no KMS key ARN" in line for line in result.findings)


def test_sqs_check_reports_fifo_deduplication(
    application: Application, make_queue: Callable[..., Queue]
) -> None:
    queue = make_queue(
        fifo=True, ContentBasedDeduplication="true", SqsManagedSseEnabled="false"
    )
    destination = sqs_destination(application, queue.name)

    result = run_check(destination)

    assert result.ok is True
    assert "FifoQueue is true." in result.findings
    assert any("ContentBasedDeduplication is true" in f for f in result.findings)


def test_sqs_check_refreshes_cached_size_limit(
    application: Application,
    make_queue: Callable[..., Queue],
    sqs_endpoint: SqsPeer,
) -> None:
    queue = make_queue(MaximumMessageSize="1048576")
    destination = sqs_destination(application, queue.name)
    run_check(destination)
    sqs_client(sqs_endpoint.endpoint_url).set_queue_attributes(
        QueueUrl=queue.peer_url, Attributes={"MaximumMessageSize": "262144"}
    )

    run_check(destination)

    key = (sqs_endpoint.endpoint_url, destination.sqs_queue_url)
    cached = sqs_transport._size_limits[key]
    assert cached.size == 262_144
    assert cached.assumed is False


def test_sqs_check_missing_queue_fails(
    application: Application, sqs_endpoint: SqsPeer
) -> None:
    destination = sqs_destination(application, f"missing-{uuid.uuid4().hex[:12]}")

    result = run_check(destination)

    assert result.ok is False
    assert result.failure is not None
    assert result.failure.kind == "queue_not_found"
    assert destination.sqs_queue_url in result.failure.message


# SQS with IAM enforced: moto checks the identity's policy after its first requests.


@dataclass(frozen=True)
class IamPeer:
    endpoint_url: str
    queue_name: str
    access_key_id: str
    secret_access_key: str


# The requests `iam_sqs_peer` makes before moto starts to enforce IAM.
SETUP_REQUESTS = 4


@pytest.fixture(scope="module")
def iam_sqs_peer() -> Iterator[IamPeer]:
    """A moto_server child that enforces IAM, with one queue and a user whose
    policy allows only sqs:SendMessage."""
    port = free_port("127.0.0.1")
    endpoint_url = f"http://127.0.0.1:{port}"
    environment = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)}
    command = [str(Path(sys.executable).parent / "moto_server")]
    # A file, not a pipe: moto logs every request, and an unread pipe stalls it.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [*command, "-H", "127.0.0.1", "-p", str(port)],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield _set_up_iam(endpoint_url)
        finally:
            process.terminate()
            process.wait(timeout=10)


def _set_up_iam(endpoint_url: str) -> IamPeer:
    session = boto3.session.Session(
        aws_access_key_id=FAKE_ACCESS_KEY_ID,
        aws_secret_access_key=FAKE_SECRET_ACCESS_KEY,
        region_name=DEFAULT_REGION,
    )
    queue_name = f"guarded-{uuid.uuid4().hex[:12]}"
    sqs = session.client("sqs", endpoint_url=endpoint_url)
    _retry_until_listening(
        lambda: sqs.create_queue(
            QueueName=queue_name, Attributes={"SqsManagedSseEnabled": "false"}
        )
    )
    iam = session.client("iam", endpoint_url=endpoint_url)
    iam.create_user(UserName="platform-test")
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "sqs:SendMessage", "Resource": "*"}
        ],
    }
    iam.put_user_policy(
        UserName="platform-test",
        PolicyName="send-only",
        PolicyDocument=json.dumps(policy),
    )
    key = iam.create_access_key(UserName="platform-test")["AccessKey"]
    return IamPeer(endpoint_url, queue_name, key["AccessKeyId"], key["SecretAccessKey"])


def _retry_until_listening(call: Callable[[], object]) -> None:
    """Make `call`, retrying while the server is not listening yet. A refused
    connection never reaches moto, so it counts no request."""
    for _ in range(300):
        try:
            call()
            return
        except EndpointConnectionError:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not listen within 30 s.")


def point_test_stage(
    settings: Settings, peer: IamPeer, key_id: str, secret: str
) -> None:
    settings.STAGE_IDENTITIES = {
        "TEST": {
            "aws_access_key_id": key_id,
            "aws_secret_access_key": secret,
            "aws_profile": "",
            "sqs_endpoint_url": peer.endpoint_url,
        }
    }


def test_sqs_check_attributes_denied_is_finding(
    application: Application, settings: Settings, iam_sqs_peer: IamPeer
) -> None:
    point_test_stage(
        settings,
        iam_sqs_peer,
        iam_sqs_peer.access_key_id,
        iam_sqs_peer.secret_access_key,
    )
    destination = sqs_destination(application, iam_sqs_peer.queue_name)

    result = run_check(destination)

    assert result.ok is False
    assert result.failure is None
    [finding] = result.findings
    assert "denied the platform's TEST AWS principal sqs:GetQueueAttributes" in finding
    assert "send a test event" in finding


def test_sqs_check_unknown_access_key_fails(
    application: Application, settings: Settings, iam_sqs_peer: IamPeer
) -> None:
    secret = "not-a-real-secret-key"
    point_test_stage(settings, iam_sqs_peer, "AKIAUNKNOWNKEY000000", secret)
    destination = sqs_destination(application, iam_sqs_peer.queue_name)

    result = run_check(destination)

    assert result.failure is not None
    assert result.failure.kind == "access_denied"
    assert "InvalidClientTokenId" in result.failure.message
    assert secret not in result.failure.message


# Pub/Sub.


@pytest.fixture
def pubsub_peer(
    local_pubsub_peer: PubSubPeer, pubsub_stage: Callable[..., None]
) -> PubSubPeer:
    pubsub_stage(local_pubsub_peer.endpoint)
    return local_pubsub_peer


def pubsub_destination(
    application: Application, topic_id: str, *, ordering: bool = False
) -> Destination:
    return Destination.objects.create(
        application=application,
        stage=Stage.TEST,
        kind=Kind.PUBSUB,
        name=f"topic {topic_id}",
        pubsub_project_id=PUBSUB_PROJECT,
        pubsub_topic_id=topic_id,
        pubsub_ordering=ordering,
        pubsub_endpoint=REGIONAL_ENDPOINT if ordering else "",
    )


def new_topic_id(peer: PubSubPeer) -> str:
    topic_id = f"checked-{uuid.uuid4().hex[:12]}"
    create_topic(peer.endpoint, PUBSUB_PROJECT, topic_id)
    return topic_id


def test_pubsub_check_granted_is_ok(
    application: Application, pubsub_peer: PubSubPeer
) -> None:
    destination = pubsub_destination(application, new_topic_id(pubsub_peer))

    result = run_check(destination)

    assert result.ok is True
    assert result.failure is None
    assert TEST_SERVICE_ACCOUNT in result.findings[0]
    assert PUBLISH in result.findings[0]


def test_pubsub_check_ordering_reminds_subscriptions(
    application: Application, pubsub_peer: PubSubPeer
) -> None:
    topic_id = new_topic_id(pubsub_peer)
    destination = pubsub_destination(application, topic_id, ordering=True)

    result = run_check(destination)

    assert result.ok is True
    assert any("--enable-message-ordering" in line for line in result.findings)


def test_pubsub_check_publishes_nothing(
    application: Application, pubsub_peer: PubSubPeer
) -> None:
    destination = pubsub_destination(application, new_topic_id(pubsub_peer))
    assert pubsub_peer.state is not None
    calls_before = len(pubsub_peer.state.calls("TestIamPermissions"))

    run_check(destination)

    assert pubsub_peer.state.published(destination.target) == []
    [call] = pubsub_peer.state.calls("TestIamPermissions")[calls_before:]
    assert call.request.resource == destination.target
    assert list(call.request.permissions) == [PUBLISH]


def test_pubsub_check_denied_names_account(
    application: Application, pubsub_peer: PubSubPeer
) -> None:
    destination = pubsub_destination(application, new_topic_id(pubsub_peer))
    pubsub_peer.deny_permissions(destination.target, [PUBLISH])

    result = run_check(destination)

    assert result.ok is False
    assert result.failure is not None
    assert result.failure.kind == "access_denied"
    assert TEST_SERVICE_ACCOUNT in result.failure.message
    assert "roles/pubsub.publisher" in result.failure.message


def test_pubsub_check_unknown_topic_fails(
    application: Application, pubsub_peer: PubSubPeer
) -> None:
    destination = pubsub_destination(application, f"missing-{uuid.uuid4().hex[:8]}")

    result = run_check(destination)

    assert result.failure is not None
    assert result.failure.kind == "topic_not_found"
    assert destination.target in result.failure.message


def test_pubsub_check_on_emulator_unconfirmed(
    application: Application,
    pubsub_official_server: OfficialEmulator,
    pubsub_stage: Callable[..., None],
) -> None:
    pubsub_stage(pubsub_official_server.endpoint)
    topic_id = f"checked-{uuid.uuid4().hex[:12]}"
    create_topic(pubsub_official_server.endpoint, PUBSUB_PROJECT, topic_id)
    destination = pubsub_destination(application, topic_id)

    result = run_check(destination)

    assert result.ok is False
    assert result.failure is None
    [finding] = result.findings
    assert "does not implement TestIamPermissions" in finding


# Service Bus.


def test_servicebus_check_valid_key_is_ok(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination()
    entity = destination.servicebus_entity_name

    result = run_check(destination)

    assert result.ok is True
    assert result.failure is None
    assert f"The connection string can send to queue {entity!r}" in result.findings[0]
    assert any("262,144 bytes" in line for line in result.findings)
    assert any("requires sessions" in line for line in result.findings)


def test_servicebus_check_sends_nothing(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination()

    run_check(destination)

    assert servicebus.messages() == []
    assert [request.status_code for request in servicebus.token_requests] == [202]


def test_servicebus_check_wrong_key_unauthorized(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    key = generate_key()
    destination = make_servicebus_destination(
        connection_string=servicebus.connection_string(key=key)
    )

    result = run_check(destination)

    assert result.failure is not None
    assert result.failure.kind == "unauthorized"
    assert key not in result.failure.message


def test_servicebus_check_listen_only_denied(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    key = generate_key()
    servicebus.add_policy("Monitoring", key, rights=["Listen"])
    destination = make_servicebus_destination(
        connection_string=servicebus.connection_string(key_name="Monitoring", key=key)
    )

    result = run_check(destination)

    assert result.failure is not None
    assert result.failure.kind == "access_denied"
    assert "'Monitoring'" in result.failure.message


def test_servicebus_check_missing_entity_fails(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination(create_entity=False)

    result = run_check(destination)

    assert result.failure is not None
    assert result.failure.kind == "entity_not_found"
    assert destination.servicebus_entity_name in result.failure.message


def test_servicebus_check_flags_message_size(
    servicebus: ServiceBusPeer, make_servicebus_destination: MakeServiceBusDestination
) -> None:
    destination = make_servicebus_destination()
    servicebus.set_max_message_size(destination.servicebus_entity_name, 1_048_576)

    result = run_check(destination)

    assert result.ok is False
    [mismatch] = result.mismatches
    assert "Maximum message size is 262,144 bytes here" in mismatch
    assert "accepts 1,048,576 bytes" in mismatch


# The default for kinds without a check.


class _SendOnly(Transport):
    kind = Kind.SQS

    def send(self, messages: Sequence[OutgoingMessage]) -> list[Result]:
        return []


def test_default_check_says_none_exists(application: Application) -> None:
    destination = Destination(application=application, kind=Kind.SQS)

    result = _SendOnly(destination).check()

    assert result.ok is False
    assert result.failure is None
    assert "No check without side effects exists for AWS SQS" in result.findings[0]


# The admin.


def check_url(destination_id: object) -> str:
    return reverse("admin:destinations_destination_check_access", args=[destination_id])


def change_url(destination: Destination) -> str:
    return reverse("admin:destinations_destination_change", args=[destination.pk])


def test_admin_change_page_shows_check_button(
    admin_client: Client, application: Application, make_queue: Callable[..., Queue]
) -> None:
    destination = sqs_destination(application, make_queue().name)

    response = admin_client.get(change_url(destination))

    assert response.status_code == 200
    assert f'action="{check_url(destination.pk)}"' in response.text
    assert ">Check access</button>" in response.text


def test_admin_check_shows_findings(
    admin_client: Client, application: Application, make_queue: Callable[..., Queue]
) -> None:
    queue = make_queue(MaximumMessageSize="262144", SqsManagedSseEnabled="false")
    destination = sqs_destination(application, queue.name)

    response = admin_client.post(check_url(destination.pk), follow=True)

    assert response.redirect_chain == [(change_url(destination), 302)]
    assert "Check access for" in response.text
    assert "found no problem" in response.text
    assert "<li>MaximumMessageSize is 262,144 bytes.</li>" in response.text


def test_admin_check_shows_mismatches(
    admin_client: Client, application: Application, make_queue: Callable[..., Queue]
) -> None:
    queue = make_queue(KmsMasterKeyId="alias/partner-orders")
    destination = sqs_destination(application, queue.name)

    response = admin_client.post(check_url(destination.pk), follow=True)

    assert "these settings differ from the queue's" in response.text
    assert "Choose SSE-KMS" in response.text


def test_admin_check_failure_links_grant(
    admin_client: Client, application: Application, sqs_endpoint: SqsPeer
) -> None:
    destination = sqs_destination(application, f"missing-{uuid.uuid4().hex[:12]}")

    response = admin_client.post(check_url(destination.pk), follow=True)

    assert "failed (queue_not_found)" in response.text
    assert '<a href="#what-to-grant">What the TEST identity needs</a>' in response.text


def test_admin_check_rejects_get(
    admin_client: Client, application: Application, make_queue: Callable[..., Queue]
) -> None:
    destination = sqs_destination(application, make_queue().name)

    response = admin_client.get(check_url(destination.pk))

    assert response.status_code == 405


def test_admin_check_rejects_view_only_staff(
    client: Client, application: Application, make_queue: Callable[..., Queue]
) -> None:
    destination = sqs_destination(application, make_queue().name)
    user = User.objects.create_user("viewer", password="pw-viewer-1", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_destination"))
    client.force_login(user)

    response = client.post(check_url(destination.pk))

    assert response.status_code == 403


def test_admin_check_requires_csrf_token(
    admin_user: User, application: Application, make_queue: Callable[..., Queue]
) -> None:
    destination = sqs_destination(application, make_queue().name)
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)

    response = client.post(check_url(destination.pk))

    assert response.status_code == 403


def test_admin_check_unknown_destination_redirects(admin_client: Client) -> None:
    response = admin_client.post(check_url(999999), follow=True)

    assert response.redirect_chain == [
        (reverse("admin:destinations_destination_changelist"), 302)
    ]
    assert "No destination with ID &#x27;999999&#x27; exists" in response.text
