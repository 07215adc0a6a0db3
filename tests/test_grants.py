"""What to grant: per stage and kind, with the stage's own identity."""

import json

import pytest
from django.test import Client
from django.urls import reverse
from pytest_django import Settings

from destinations.grants import grant_for, queue_arn
from destinations.models import Application, Destination, EntityType, Kind, Stage

pytestmark = pytest.mark.django_db

TEST_ROLE = "arn:aws:iam::111122223333:role/platform-test-sender"
PROD_ROLE = "arn:aws:iam::444455556666:role/platform-prod-sender"
TEST_ACCOUNT = "platform-test@platform-test.iam.gserviceaccount.com"
PROD_ACCOUNT = "platform-prod@platform-prod.iam.gserviceaccount.com"
KEY_ARN = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
CONNECTION_STRING = (
    "Endpoint=sb://partner-events.servicebus.windows.net/;"
    "SharedAccessKeyName=platform-test-send;SharedAccessKey=c2VjcmV0;"
    "EntityPath=orders"
)


@pytest.fixture(autouse=True)
def identities(settings: Settings) -> None:
    settings.STAGE_IDENTITIES = {
        "TEST": {"aws_principal_arn": TEST_ROLE, "gcp_service_account": TEST_ACCOUNT},
        "PROD": {"aws_principal_arn": PROD_ROLE, "gcp_service_account": PROD_ACCOUNT},
    }


@pytest.fixture
def application() -> Application:
    return Application.objects.create(name="Shop", slug="shop")


def sqs(
    application: Application, stage: str = Stage.TEST, **fields: object
) -> Destination:
    destination = Destination(
        application=application,
        stage=stage,
        kind=Kind.SQS,
        name=f"queue {stage}",
        sqs_queue_url="https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo",
        sqs_fifo=True,
        **fields,
    )
    destination.save()
    return destination


def statement(snippet: str) -> dict[str, object]:
    return dict(json.loads(snippet))


def test_sqs_statement_names_stage_principal_and_queue_arn(
    application: Application,
) -> None:
    grant = grant_for(sqs(application))

    policy = statement(grant.steps[0].snippet)
    assert grant.identity == TEST_ROLE
    assert policy["Principal"] == {"AWS": TEST_ROLE}
    assert "sqs:SendMessage" in policy["Action"]  # type: ignore[operator]
    assert policy["Resource"] == "arn:aws:sqs:eu-west-1:123456789012:orders.fifo"
    assert len(grant.steps) == 1


def test_prod_destination_names_prod_principal_only(application: Application) -> None:
    grant = grant_for(sqs(application, Stage.PROD))

    text = json.dumps([step.snippet for step in grant.steps])
    assert PROD_ROLE in text
    assert TEST_ROLE not in text
    assert any("PROD AWS principal" in note for note in grant.notes)


def test_sse_kms_adds_key_policy_and_alias_note(application: Application) -> None:
    grant = grant_for(
        sqs(application, sqs_encryption="sse-kms", sqs_kms_key_arn=KEY_ARN)
    )

    key_policy = statement(grant.steps[1].snippet)
    assert key_policy["Action"] == ["kms:GenerateDataKey", "kms:Decrypt"]
    assert key_policy["Principal"] == {"AWS": TEST_ROLE}
    assert KEY_ARN in grant.steps[1].text
    assert any("alias/aws/sqs" in note for note in grant.notes)


def test_missing_principal_says_which_setting(
    application: Application, settings: Settings
) -> None:
    settings.STAGE_IDENTITIES = {"TEST": {}, "PROD": {}}

    grant = grant_for(sqs(application))

    assert grant.identity == "(not configured: set TEST_AWS_PRINCIPAL_ARN)"


@pytest.mark.parametrize(
    ("url", "arn"),
    [
        (
            "https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q",
            "arn:aws-cn:sqs:cn-north-1:123456789012:q",
        ),
        (
            "https://queue.amazonaws.com/123456789012/q",
            "arn:aws:sqs:us-east-1:123456789012:q",
        ),
        ("not a url", ""),
    ],
)
def test_queue_arn_from_url(url: str, arn: str) -> None:
    assert queue_arn(url) == arn


def test_pubsub_binding_and_ordering_subscription(application: Application) -> None:
    destination = Destination(
        application=application,
        stage=Stage.TEST,
        kind=Kind.PUBSUB,
        name="topic",
        pubsub_project_id="partner-project",
        pubsub_topic_id="orders",
        pubsub_ordering=True,
        pubsub_endpoint="europe-west1-pubsub.googleapis.com:443",
    )
    destination.save()

    grant = grant_for(destination)

    binding = grant.steps[0].snippet
    assert "gcloud pubsub topics add-iam-policy-binding orders" in binding
    assert "--project=partner-project" in binding
    assert f"--member=serviceAccount:{TEST_ACCOUNT}" in binding
    assert "--role=roles/pubsub.publisher" in binding
    assert "--enable-message-ordering" in grant.steps[1].snippet
    assert any("a PROD topic that trusts" in note for note in grant.notes)


def test_sqs_stage_note_names_queue(application: Application) -> None:
    grant = grant_for(sqs(application))

    assert any("a PROD queue that trusts" in note for note in grant.notes)


def test_servicebus_send_only_policy_commands(application: Application) -> None:
    destination = Destination(
        application=application,
        stage=Stage.TEST,
        kind=Kind.SERVICEBUS,
        name="bus",
        servicebus_entity_type=EntityType.TOPIC,
    )
    destination.set_connection_string(CONNECTION_STRING)
    destination.save()

    grant = grant_for(destination)

    create = grant.steps[0].snippet
    assert create.startswith("az servicebus topic authorization-rule create")
    assert "--namespace-name partner-events" in create
    assert "--topic-name orders" in create
    assert "--rights Send" in create
    assert "EntityPath=orders" in grant.steps[1].text
    assert "c2VjcmV0" not in json.dumps(grant.__dict__, default=str)


def test_change_page_shows_grant_panel(
    admin_client: Client, application: Application
) -> None:
    destination = sqs(application)

    response = admin_client.get(
        reverse("admin:destinations_destination_change", args=[destination.pk])
    )

    assert response.status_code == 200
    assert 'id="what-to-grant"' in response.text
    assert TEST_ROLE in response.text
    assert "arn:aws:sqs:eu-west-1:123456789012:orders.fifo" in response.text
