"""Validation and normalisation of each destination kind's configuration on save."""

from typing import Any
from urllib.parse import quote

import pytest
from django.core.exceptions import ValidationError

from destinations.models import Application, Destination, Kind, SqsEncryption, Stage
from destinations.validation.servicebus import parse_connection_string

pytestmark = pytest.mark.django_db

QUEUE_URL_PREFIX = "https://sqs.eu-west-1.amazonaws.com/123456789012/"
QUEUE_URL = f"{QUEUE_URL_PREFIX}orders"
FIFO_QUEUE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo"
KEY_ARN = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
ALIAS_ARN = "arn:aws:kms:eu-west-1:123456789012:alias/partner-events"

SHARED_ACCESS_KEY = "c2VjcmV0LWtleS12YWx1ZS10aGF0LW11c3Qtbm90LWxlYWs="
SIGNATURE_VALUE = "dGhlLXNpZ25hdHVyZS1tdXN0LW5vdC1sZWFr%3d"
ENDPOINT = "Endpoint=sb://partner-events.servicebus.windows.net/"
CREDENTIALS = f"SharedAccessKeyName=platform-send;SharedAccessKey={SHARED_ACCESS_KEY}"
CONNECTION_STRING = f"{ENDPOINT};{CREDENTIALS}"
# 2100-01-01 and 2001-09-09, as seconds since 1970.
FUTURE_EXPIRY = 4102444800
PAST_EXPIRY = 1000000000


# Digits to Unicode, not to int() or to a regular expression's [0-9].
ARABIC_ACCOUNT = "".join(chr(0x0660 + int(digit)) for digit in "123456789012")
LONG_CONNECTION_STRING = f"{CONNECTION_STRING};EntityPath={'a' * 4000}"


def emulator_string(port: str) -> str:
    return f"Endpoint=sb://127.0.0.1:{port};{CREDENTIALS};UseDevelopmentEmulator=true"


def signature(expiry: int | str) -> str:
    return (
        "SharedAccessSignature sr=sb%3a%2f%2fpartner-events.servicebus.windows.net"
        f"%2forders&sig={SIGNATURE_VALUE}&se={expiry}&skn=platform-send"
    )


@pytest.fixture
def application() -> Application:
    return Application.objects.create(name="Shop", slug="shop")


def build(application: Application, kind: str, **values: Any) -> Destination:
    """Return an unsaved destination, passing `connection_string` to its setter."""
    connection_string = values.pop("connection_string", None)
    values.setdefault("name", "Partner events")
    destination = Destination(
        application=application, stage=Stage.TEST, kind=kind, **values
    )
    if connection_string is not None:
        destination.set_connection_string(connection_string)
    return destination


def validation_error(destination: Destination) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        destination.full_clean()
    return caught.value


VALID = [
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": QUEUE_URL},
        {"sqs_queue_url": QUEUE_URL, "sqs_region": "eu-west-1", "sqs_fifo": False},
        id="sqs-standard-fills-region",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": FIFO_QUEUE_URL, "sqs_fifo": True},
        {"sqs_queue_url": FIFO_QUEUE_URL, "sqs_region": "eu-west-1", "sqs_fifo": True},
        id="sqs-fifo",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": f"  {QUEUE_URL}/ \n"},
        {"sqs_queue_url": QUEUE_URL},
        id="sqs-strips-whitespace-and-slash",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": "https://queue.amazonaws.com/123456789012/orders"},
        {"sqs_region": "us-east-1"},
        id="sqs-legacy-host-is-us-east-1",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": "https://ap-southeast-2.queue.amazonaws.com/123456789012/q"},
        {"sqs_region": "ap-southeast-2"},
        id="sqs-region-queue-host",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": "https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q"},
        {"sqs_region": "cn-north-1"},
        id="sqs-china-partition",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": "HTTPS://SQS.EU-WEST-1.AMAZONAWS.COM/123456789012/Orders"},
        {
            "sqs_queue_url": "https://sqs.eu-west-1.amazonaws.com/123456789012/Orders",
            "sqs_region": "eu-west-1",
        },
        id="sqs-lowercases-scheme-and-host",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": QUEUE_URL, "sqs_region": " EU-WEST-1 "},
        {"sqs_region": "eu-west-1"},
        id="sqs-matching-region-normalised",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": f"{QUEUE_URL_PREFIX}{'q' * 80}"},
        {"sqs_region": "eu-west-1"},
        id="sqs-name-of-80-characters",
    ),
    pytest.param(
        Kind.SQS,
        {
            "sqs_queue_url": (
                f"https://sqs.eu-west-1.amazonaws.com/123456789012/{'q' * 75}.fifo"
            ),
            "sqs_fifo": True,
        },
        {"sqs_fifo": True},
        id="sqs-fifo-name-of-80-characters",
    ),
    pytest.param(
        Kind.SQS,
        {
            "sqs_queue_url": QUEUE_URL,
            "sqs_encryption": SqsEncryption.SSE_KMS,
            "sqs_kms_key_arn": f" {KEY_ARN} ",
        },
        {"sqs_kms_key_arn": KEY_ARN},
        id="sqs-sse-kms-key-arn",
    ),
    pytest.param(
        Kind.SQS,
        {
            "sqs_queue_url": QUEUE_URL,
            "sqs_encryption": SqsEncryption.SSE_KMS,
            "sqs_kms_key_arn": ALIAS_ARN,
        },
        {"sqs_kms_key_arn": ALIAS_ARN},
        id="sqs-sse-kms-alias-arn",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": QUEUE_URL, "sqs_encryption": SqsEncryption.SSE_KMS},
        {"sqs_kms_key_arn": ""},
        id="sqs-sse-kms-without-arn",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_project_id": "partner-project", "pubsub_topic_id": "orders"},
        {"pubsub_project_id": "partner-project", "pubsub_topic_id": "orders"},
        id="pubsub-project-and-topic",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_topic_id": " projects/partner-project/topics/orders "},
        {"pubsub_project_id": "partner-project", "pubsub_topic_id": "orders"},
        id="pubsub-topic-path-split",
    ),
    pytest.param(
        Kind.PUBSUB,
        {
            "pubsub_project_id": "partner-project",
            "pubsub_topic_id": "projects/partner-project/topics/orders",
        },
        {"pubsub_project_id": "partner-project", "pubsub_topic_id": "orders"},
        id="pubsub-topic-path-with-same-project",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_project_id": "projects/partner-project/topics/orders"},
        {"pubsub_project_id": "partner-project", "pubsub_topic_id": "orders"},
        id="pubsub-path-in-project-field-split",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_project_id": "projects/partner-project", "pubsub_topic_id": "orders"},
        {"pubsub_project_id": "partner-project"},
        id="pubsub-project-path-stripped",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_project_id": "example.com:partner-project", "pubsub_topic_id": "t-1"},
        {"pubsub_project_id": "example.com:partner-project"},
        id="pubsub-domain-scoped-project",
    ),
    pytest.param(
        Kind.PUBSUB,
        {
            "pubsub_project_id": "partner-project",
            "pubsub_topic_id": "Orders.v1~a+b%c_d",
        },
        {"pubsub_topic_id": "Orders.v1~a+b%c_d"},
        id="pubsub-topic-special-characters",
    ),
    pytest.param(
        Kind.PUBSUB,
        {
            "pubsub_project_id": "partner-project",
            "pubsub_topic_id": "orders",
            "pubsub_ordering": True,
            "pubsub_endpoint": "europe-west1-pubsub.googleapis.com:443",
        },
        {"pubsub_endpoint": "europe-west1-pubsub.googleapis.com:443"},
        id="pubsub-ordering-regional-endpoint",
    ),
    pytest.param(
        Kind.PUBSUB,
        {
            "pubsub_project_id": "partner-project",
            "pubsub_topic_id": "orders",
            "pubsub_ordering": True,
            "pubsub_endpoint": "https://us-central1-pubsub.googleapis.com/",
        },
        {"pubsub_endpoint": "us-central1-pubsub.googleapis.com"},
        id="pubsub-endpoint-scheme-stripped",
    ),
    pytest.param(
        Kind.PUBSUB,
        {
            "pubsub_project_id": "partner-project",
            "pubsub_topic_id": "orders",
            "pubsub_endpoint": "pubsub.googleapis.com:443",
        },
        {"pubsub_endpoint": "pubsub.googleapis.com:443"},
        id="pubsub-global-endpoint-without-ordering",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {"connection_string": CONNECTION_STRING, "servicebus_entity_name": "orders"},
        {
            "servicebus_namespace": "partner-events.servicebus.windows.net",
            "servicebus_key_name": "platform-send",
            "servicebus_entity_path": "",
            "servicebus_entity_name": "orders",
        },
        id="servicebus-namespace-string-and-entity-name",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {"connection_string": f"{CONNECTION_STRING};EntityPath=orders"},
        {"servicebus_entity_path": "orders", "servicebus_entity_name": "orders"},
        id="servicebus-entity-name-from-entity-path",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": f"{CONNECTION_STRING};EntityPath=orders",
            "servicebus_entity_name": " orders ",
        },
        {"servicebus_entity_path": "orders", "servicebus_entity_name": "orders"},
        id="servicebus-entity-path-equals-name",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": f"  \n{CONNECTION_STRING};EntityPath=orders; \n",
        },
        {"servicebus_key_name": "platform-send", "servicebus_entity_name": "orders"},
        id="servicebus-trailing-semicolon-and-whitespace",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                "endpoint=sb://partner-events.servicebus.windows.net/;"
                "SHAREDACCESSKEYNAME=platform-send;"
                f"sharedAccessKey={SHARED_ACCESS_KEY};entitypath=orders"
            ),
        },
        {"servicebus_key_name": "platform-send", "servicebus_entity_path": "orders"},
        id="servicebus-keys-case-insensitive",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                "Endpoint=sb://partner-events.servicebus.chinacloudapi.cn/;"
                f"{CREDENTIALS};EntityPath=orders"
            ),
        },
        {"servicebus_namespace": "partner-events.servicebus.chinacloudapi.cn"},
        id="servicebus-sovereign-cloud",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=K;"
                "SharedAccessKey=S;UseDevelopmentEmulator=true"
            ),
            "servicebus_entity_name": "orders",
        },
        {"servicebus_namespace": "127.0.0.1:5672", "servicebus_key_name": "K"},
        id="servicebus-development-emulator",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                "Endpoint=sb://localhost/;SharedAccessKeyName=K;SharedAccessKey=S;"
                "UseDevelopmentEmulator=true;EntityPath=orders"
            ),
        },
        {"servicebus_namespace": "localhost"},
        id="servicebus-emulator-without-port",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                f"{ENDPOINT};SharedAccessSignature={signature(FUTURE_EXPIRY)}"
            ),
            "servicebus_entity_name": "orders",
        },
        {"servicebus_key_name": "platform-send", "servicebus_entity_path": ""},
        id="servicebus-shared-access-signature",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": f"{CONNECTION_STRING};EntityPath=orders",
            "servicebus_entity_type": "topic",
            "servicebus_partitioning": True,
            "servicebus_sessions": True,
        },
        {"servicebus_partitioning": True, "servicebus_sessions": True},
        id="servicebus-topic-with-flags",
    ),
]


@pytest.mark.parametrize(("kind", "values", "expected"), VALID)
def test_valid_configuration_saved_normalised(
    application: Application,
    kind: str,
    values: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    destination = build(application, kind, **values)
    destination.save()
    destination.refresh_from_db()

    for field, value in expected.items():
        assert getattr(destination, field) == value, field


# Each case: the field the error is keyed on, a distinctive part of its message,
# and the offending value, which the message must quote.
INVALID = [
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": "http://sqs.eu-west-1.amazonaws.com/123456789012/orders"},
        "sqs_queue_url",
        "must start with https://",
        "http://sqs.eu-west-1.amazonaws.com/123456789012/orders",
        id="sqs-url-without-https",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": "arn:aws:sqs:eu-west-1:123456789012:orders"},
        "sqs_queue_url",
        f"is the queue's ARN, not its URL. Enter the URL instead: {QUEUE_URL}.",
        "arn:aws:sqs:eu-west-1:123456789012:orders",
        id="sqs-queue-arn-instead-of-url",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": "orders"},
        "sqs_queue_url",
        "is not an SQS queue URL",
        "orders",
        id="sqs-bare-queue-name",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": "https://sqs.eu-west-1.example.com/123456789012/orders"},
        "sqs_queue_url",
        "is not an SQS endpoint",
        "sqs.eu-west-1.example.com",
        id="sqs-foreign-host",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": "http://127.0.0.1:5000/123456789012/orders"},
        "sqs_queue_url",
        "is not an SQS endpoint",
        "127.0.0.1:5000",
        id="sqs-local-peer-url",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": "https://sqs.cn-north-1.amazonaws.com/123456789012/orders"},
        "sqs_queue_url",
        "is served under amazonaws.com.cn",
        "sqs.cn-north-1.amazonaws.com",
        id="sqs-china-region-without-cn-domain",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": "https://sqs.eu-west-1.amazonaws.com.cn/123456789012/q"},
        "sqs_queue_url",
        "is served under amazonaws.com",
        "sqs.eu-west-1.amazonaws.com.cn",
        id="sqs-cn-domain-outside-china",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": "https://sqs.eu-west-1.amazonaws.com/12345678901/orders"},
        "sqs_queue_url",
        "is not an AWS account ID, which has 12 digits",
        "12345678901",
        id="sqs-account-of-11-digits",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": "https://sqs.eu-west-1.amazonaws.com/123456789012/ord!ers"},
        "sqs_queue_url",
        "A queue name has 1 to 80 letters, digits, hyphens or underscores",
        "ord!ers",
        id="sqs-name-with-exclamation-mark",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": f"{QUEUE_URL_PREFIX}{'q' * 81}"},
        "sqs_queue_url",
        "A queue name has 1 to 80",
        "q" * 81,
        id="sqs-name-of-81-characters",
    ),
    pytest.param(
        Kind.SQS,
        {
            "sqs_queue_url": (
                f"https://sqs.eu-west-1.amazonaws.com/123456789012/{'q' * 76}.fifo"
            ),
            "sqs_fifo": True,
        },
        "sqs_queue_url",
        "at most 75 of them followed by .fifo",
        f"{'q' * 76}.fifo",
        id="sqs-fifo-name-of-81-characters",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": QUEUE_URL, "sqs_region": "us-east-1"},
        "sqs_region",
        'A client in the wrong region gets "queue does not exist"',
        "us-east-1",
        id="sqs-region-differs-from-url",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": QUEUE_URL, "sqs_region": "Ireland"},
        "sqs_region",
        "is not an AWS region code",
        "ireland",
        id="sqs-region-name-instead-of-code",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": QUEUE_URL, "sqs_fifo": True},
        "sqs_fifo",
        "is a standard queue",
        "orders",
        id="sqs-fifo-flag-on-standard-queue",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": FIFO_QUEUE_URL},
        "sqs_fifo",
        "is a FIFO queue, because its name ends in .fifo. Tick FIFO queue",
        "orders.fifo",
        id="sqs-fifo-queue-without-flag",
    ),
    pytest.param(
        Kind.SQS,
        {
            "sqs_queue_url": QUEUE_URL,
            "sqs_encryption": SqsEncryption.SSE_SQS,
            "sqs_kms_key_arn": KEY_ARN,
        },
        "sqs_kms_key_arn",
        "is only used with SSE-KMS",
        KEY_ARN,
        id="sqs-kms-key-without-sse-kms",
    ),
    pytest.param(
        Kind.SQS,
        {
            "sqs_queue_url": QUEUE_URL,
            "sqs_encryption": SqsEncryption.SSE_KMS,
            "sqs_kms_key_arn": "arn:aws:kms:eu-west-1:123456789012:alias/aws/sqs",
        },
        "sqs_kms_key_arn",
        "is an AWS managed key (alias/aws/sqs), which cannot be used across accounts",
        "arn:aws:kms:eu-west-1:123456789012:alias/aws/sqs",
        id="sqs-aws-managed-kms-key",
    ),
    pytest.param(
        Kind.SQS,
        {
            "sqs_queue_url": QUEUE_URL,
            "sqs_encryption": SqsEncryption.SSE_KMS,
            "sqs_kms_key_arn": "1234abcd-12ab-34cd-56ef-1234567890ab",
        },
        "sqs_kms_key_arn",
        "is not a KMS key ARN",
        "1234abcd-12ab-34cd-56ef-1234567890ab",
        id="sqs-kms-key-id-instead-of-arn",
    ),
    pytest.param(
        Kind.SQS,
        {
            "sqs_queue_url": QUEUE_URL,
            "sqs_encryption": SqsEncryption.SSE_KMS,
            "sqs_kms_key_arn": KEY_ARN.replace("123456789012", ARABIC_ACCOUNT),
        },
        "sqs_kms_key_arn",
        "is not a KMS key ARN",
        ARABIC_ACCOUNT,
        id="sqs-kms-key-arn-with-arabic-indic-account",
    ),
    pytest.param(
        Kind.SQS,
        {
            "sqs_queue_url": QUEUE_URL,
            "sqs_encryption": SqsEncryption.SSE_KMS,
            "sqs_kms_key_arn": KEY_ARN.replace("eu-west-1", "eu-west-\u0661"),
        },
        "sqs_kms_key_arn",
        "is not a KMS key ARN",
        "eu-west-\u0661",
        id="sqs-kms-key-arn-with-arabic-indic-region",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": QUEUE_URL.replace("123456789012", ARABIC_ACCOUNT)},
        "sqs_queue_url",
        "is not an AWS account ID, which has 12 digits",
        ARABIC_ACCOUNT,
        id="sqs-account-of-arabic-indic-digits",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": QUEUE_URL.replace("eu-west-1", "eu-west-\u0661")},
        "sqs_queue_url",
        "is not an SQS endpoint",
        "eu-west-\u0661",
        id="sqs-url-region-of-arabic-indic-digit",
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": QUEUE_URL, "sqs_region": "eu-west-\u0661"},
        "sqs_region",
        "is not an AWS region code",
        "eu-west-\u0661",
        id="sqs-region-of-arabic-indic-digit",
    ),
    pytest.param(
        Kind.SQS,
        {
            "sqs_queue_url": QUEUE_URL,
            "sqs_encryption": SqsEncryption.SSE_KMS,
            "sqs_kms_key_arn": KEY_ARN.replace("eu-west-1", "us-east-1"),
        },
        "sqs_kms_key_arn",
        "SQS can only use a key of the queue's own region",
        KEY_ARN.replace("eu-west-1", "us-east-1"),
        id="sqs-kms-key-in-other-region",
    ),
    pytest.param(
        Kind.SQS,
        {
            "sqs_queue_url": QUEUE_URL,
            "sqs_encryption": SqsEncryption.SSE_KMS,
            "sqs_kms_key_arn": KEY_ARN.replace("arn:aws:", "arn:aws-cn:"),
        },
        "sqs_kms_key_arn",
        "whose ARNs start with arn:aws:kms",
        KEY_ARN.replace("arn:aws:", "arn:aws-cn:"),
        id="sqs-kms-key-in-wrong-partition",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_project_id": "Partner-Project", "pubsub_topic_id": "orders"},
        "pubsub_project_id",
        "is not a Google Cloud project ID",
        "Partner-Project",
        id="pubsub-project-id-with-capitals",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_project_id": "123456789012", "pubsub_topic_id": "orders"},
        "pubsub_project_id",
        "not the project's name or number",
        "123456789012",
        id="pubsub-project-number",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_project_id": "short", "pubsub_topic_id": "orders"},
        "pubsub_project_id",
        "has 6 to 30 lowercase letters",
        "short",
        id="pubsub-project-id-of-5-characters",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_project_id": "partner-project-", "pubsub_topic_id": "orders"},
        "pubsub_project_id",
        "does not end with a hyphen",
        "partner-project-",
        id="pubsub-project-id-ending-in-hyphen",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_project_id": "partner-project", "pubsub_topic_id": "1orders"},
        "pubsub_topic_id",
        "must start with a letter",
        "1orders",
        id="pubsub-topic-starting-with-digit",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_project_id": "partner-project", "pubsub_topic_id": "ab"},
        "pubsub_topic_id",
        "has 3 to 255 characters, not 2",
        "ab",
        id="pubsub-topic-of-2-characters",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_project_id": "partner-project", "pubsub_topic_id": "t" * 256},
        "pubsub_topic_id",
        "has 3 to 255 characters, not 256",
        "t" * 256,
        id="pubsub-topic-of-256-characters",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_project_id": "partner-project", "pubsub_topic_id": "order events"},
        "pubsub_topic_id",
        "may only contain letters, digits and the characters",
        "order events",
        id="pubsub-topic-with-space",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_project_id": "partner-project", "pubsub_topic_id": "google-events"},
        "pubsub_topic_id",
        "starting with goog are reserved by Google",
        "google-events",
        id="pubsub-topic-starting-with-goog",
    ),
    pytest.param(
        Kind.PUBSUB,
        {
            "pubsub_project_id": "partner-project",
            "pubsub_topic_id": "projects/partner-project/subscriptions/orders",
        },
        "pubsub_topic_id",
        "Enter the topic ID alone",
        "projects/partner-project/subscriptions/orders",
        id="pubsub-subscription-instead-of-topic",
    ),
    pytest.param(
        Kind.PUBSUB,
        {
            "pubsub_project_id": "partner-project",
            "pubsub_topic_id": "projects/other-project/topics/orders",
        },
        "pubsub_project_id",
        "differs from project 'other-project' in the topic's full name",
        "partner-project",
        id="pubsub-topic-path-other-project",
    ),
    pytest.param(
        Kind.PUBSUB,
        {
            "pubsub_project_id": "projects/partner-project/topics/orders",
            "pubsub_topic_id": "invoices",
        },
        "pubsub_topic_id",
        "differs from topic 'orders' in the full name pasted into the project ID",
        "invoices",
        id="pubsub-project-path-other-topic",
    ),
    pytest.param(
        Kind.PUBSUB,
        {
            "pubsub_project_id": "partner-project",
            "pubsub_topic_id": "orders",
            "pubsub_ordering": True,
            "pubsub_endpoint": "pubsub.googleapis.com",
        },
        "pubsub_endpoint",
        "is the global endpoint",
        "pubsub.googleapis.com",
        id="pubsub-ordering-on-global-endpoint",
    ),
    pytest.param(
        Kind.PUBSUB,
        {
            "pubsub_project_id": "partner-project",
            "pubsub_topic_id": "orders",
            "pubsub_endpoint": "pubsub.example.com",
        },
        "pubsub_endpoint",
        "is not a Pub/Sub regional endpoint",
        "pubsub.example.com",
        id="pubsub-foreign-endpoint",
    ),
    pytest.param(
        Kind.PUBSUB,
        {
            "pubsub_project_id": "partner-project",
            "pubsub_topic_id": "orders",
            "pubsub_ordering": True,
            "pubsub_endpoint": "europe-west1-pubsub.googleapis.com:8443",
        },
        "pubsub_endpoint",
        "with an optional :443",
        "europe-west1-pubsub.googleapis.com:8443",
        id="pubsub-endpoint-with-other-port",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                f"{ENDPOINT};SharedAccess KeyName=platform-send;"
                f"SharedAccessKey={SHARED_ACCESS_KEY};EntityPath=orders"
            ),
        },
        "servicebus_connection_string",
        "has a space in its key",
        "The pair 'SharedAccess KeyName'",
        id="servicebus-space-in-key",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {"connection_string": f"{ENDPOINT};;{CREDENTIALS};EntityPath=orders"},
        "servicebus_connection_string",
        "is empty: remove the extra ';'",
        "Pair 2",
        id="servicebus-empty-pair",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                f"{ENDPOINT};SharedAccessKeyName;SharedAccessKey={SHARED_ACCESS_KEY}"
            ),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "has no '='. Each pair is written Key=value",
        "The pair 'SharedAccessKeyName'",
        id="servicebus-pair-without-equals",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                "Endpoint=https://partner-events.servicebus.windows.net/;"
                f"{CREDENTIALS};EntityPath=orders"
            ),
        },
        "servicebus_connection_string",
        "must start with sb://. Paste the whole connection string",
        "https://partner-events.servicebus.windows.net/",
        id="servicebus-endpoint-without-sb",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                "Endpoint=partner-events.servicebus.windows.net;"
                f"{CREDENTIALS};EntityPath=orders"
            ),
        },
        "servicebus_connection_string",
        "must start with sb://",
        "partner-events.servicebus.windows.net",
        id="servicebus-endpoint-host-only",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": f"{ENDPOINT}orders;{CREDENTIALS}",
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "must name the namespace only",
        "sb://partner-events.servicebus.windows.net/orders",
        id="servicebus-endpoint-with-entity",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": f"{ENDPOINT};SharedAccessKeyName=platform-send",
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "has no SharedAccessKey",
        "platform-send",
        id="servicebus-key-name-without-key",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                f"{ENDPOINT};UseDevelopmentEmulator=false;"
                f"SharedAccessKey={SHARED_ACCESS_KEY}"
            ),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "has no SharedAccessKeyName naming its policy",
        "SharedAccessKey",
        id="servicebus-key-without-key-name",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                f"{CONNECTION_STRING};SharedAccessSignature={signature(FUTURE_EXPIRY)}"
            ),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "Keep only one of the two ways to sign in",
        "SharedAccessSignature",
        id="servicebus-key-and-signature",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                f"{ENDPOINT};SharedAccessSignature={signature(PAST_EXPIRY)}"
            ),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "expired at 2001-09-09 01:46:40 UTC",
        "SharedAccessSignature",
        id="servicebus-expired-signature",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": f"{ENDPOINT};SharedAccessSignature=sig=abc",
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "is not a shared access signature token",
        "SharedAccessSignature",
        id="servicebus-malformed-signature",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": f"{CONNECTION_STRING};TransportType=AmqpWebSockets",
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "is not a Service Bus connection string key",
        "'TransportType'",
        id="servicebus-unknown-key",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {"connection_string": f"{CONNECTION_STRING};EntityPath=a;EntityPath=b"},
        "servicebus_connection_string",
        "appears more than once",
        "EntityPath",
        id="servicebus-duplicate-key",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": f"{ENDPOINT};{CREDENTIALS} ;EntityPath=orders",
        },
        "servicebus_connection_string",
        "starts or ends with a space",
        "SharedAccessKey",
        id="servicebus-space-after-key",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                f"Endpoint=sb://short.servicebus.windows.net/;{CREDENTIALS}"
            ),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "A namespace name has 6 to 50 characters, not 5",
        "'short'",
        id="servicebus-namespace-of-5-characters",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                f"Endpoint=sb://partner-sb.servicebus.windows.net/;{CREDENTIALS}"
            ),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "reserves namespace names ending in -sb or -mgmt",
        "'partner-sb'",
        id="servicebus-namespace-ending-in-sb",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                f"Endpoint=sb://1partner.servicebus.windows.net/;{CREDENTIALS}"
            ),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "starts with a letter",
        "'1partner'",
        id="servicebus-namespace-starting-with-digit",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                f"Endpoint=sb://partner_events.servicebus.windows.net/;{CREDENTIALS}"
            ),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "contains only letters, digits and hyphens",
        "'partner_events'",
        id="servicebus-namespace-with-underscore",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                f"Endpoint=sb://partner-events.example.com/;{CREDENTIALS}"
            ),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "is not a Service Bus namespace",
        "partner-events.example.com",
        id="servicebus-foreign-host",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                f"Endpoint=sb://partner-events.servicebus.windows.net:5671/;"
                f"{CREDENTIALS}"
            ),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "has a port (5671)",
        "partner-events.servicebus.windows.net",
        id="servicebus-port-on-cloud-host",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=K;"
                "SharedAccessKey=S;UseDevelopmentEmulator=True"
            ),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "must be written UseDevelopmentEmulator=true, because the Service Bus client",
        "UseDevelopmentEmulator=True",
        id="servicebus-emulator-flag-capitalised",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=K;SharedAccessKey=S"
            ),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "needs UseDevelopmentEmulator=true",
        "127.0.0.1",
        id="servicebus-local-host-without-emulator-flag",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": f"{CONNECTION_STRING};UseDevelopmentEmulator=true",
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "is only for a local emulator at 127.0.0.1 or localhost",
        "partner-events.servicebus.windows.net",
        id="servicebus-emulator-flag-on-cloud-host",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": f"{CONNECTION_STRING};UseDevelopmentEmulator=yes",
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "must be true or false",
        "'yes'",
        id="servicebus-emulator-flag-not-boolean",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {"connection_string": f"{CONNECTION_STRING};EntityPath=orders?x"},
        "servicebus_connection_string",
        "must not contain these characters: ?.",
        "EntityPath 'orders?x'",
        id="servicebus-entity-path-with-question-mark",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": f"{CONNECTION_STRING};EntityPath=orders",
            "servicebus_entity_name": "invoices",
        },
        "servicebus_entity_name",
        "differs from EntityPath 'orders' in the connection string",
        "invoices",
        id="servicebus-entity-name-differs-from-path",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {"connection_string": CONNECTION_STRING, "servicebus_entity_name": "a#b"},
        "servicebus_entity_name",
        "must not contain these characters: #.",
        "a#b",
        id="servicebus-entity-name-with-hash",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {"connection_string": CONNECTION_STRING, "servicebus_entity_name": "/orders"},
        "servicebus_entity_name",
        "must not start or end with '/'",
        "/orders",
        id="servicebus-entity-name-leading-slash",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {"connection_string": CONNECTION_STRING, "servicebus_entity_name": "e" * 261},
        "servicebus_entity_name",
        "has at most 260 characters, not 261",
        "e" * 261,
        id="servicebus-entity-name-of-261-characters",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": f"{CONNECTION_STRING};EntityPath=orders",
            "servicebus_max_message_size": 200 * 1024 * 1024,
        },
        "servicebus_max_message_size",
        "is larger than Service Bus allows",
        str(200 * 1024 * 1024),
        id="servicebus-max-message-size-over-100-mb",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": f"{CONNECTION_STRING};EntityPath=orders",
            "servicebus_max_message_size": 0,
        },
        "servicebus_max_message_size",
        "is smaller than 1024 bytes",
        "0",
        id="servicebus-max-message-size-zero",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": f"{CONNECTION_STRING};EntityPath=orders",
            "servicebus_max_message_size": 1023,
        },
        "servicebus_max_message_size",
        "is smaller than 1024 bytes",
        "1023",
        id="servicebus-max-message-size-1023",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": emulator_string("\u00b2"),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "has an invalid port",
        "\u00b2",
        id="servicebus-port-superscript-two",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": emulator_string("\u0665\u0666\u0667\u0662"),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "has an invalid port",
        "\u0665\u0666\u0667\u0662",
        id="servicebus-port-of-arabic-indic-digits",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                f"{ENDPOINT};SharedAccessSignature={signature('\u00b2')}"
            ),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "is not a number of seconds since 1970",
        "se",
        id="servicebus-expiry-superscript-two",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": (
                f"{ENDPOINT};SharedAccessSignature={signature(10**20)}"
            ),
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        "is after the year 9999",
        str(10**20),
        id="servicebus-expiry-beyond-datetime",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {
            "connection_string": LONG_CONNECTION_STRING,
            "servicebus_entity_name": "orders",
        },
        "servicebus_connection_string",
        f"is {len(LONG_CONNECTION_STRING)} characters long",
        "4096",
        id="servicebus-connection-string-too-long",
    ),
]


@pytest.mark.parametrize(("kind", "values", "field", "fragment", "value"), INVALID)
def test_invalid_configuration_names_field_and_value(
    application: Application,
    kind: str,
    values: dict[str, Any],
    field: str,
    fragment: str,
    value: str,
) -> None:
    errors = validation_error(build(application, kind, **values)).message_dict

    assert field in errors, errors
    messages = "\n".join(errors[field])
    assert fragment in messages
    assert value in messages


MISSING = [
    pytest.param(
        Kind.SQS, {}, "sqs_queue_url", "Enter the queue URL", id="sqs-queue-url"
    ),
    pytest.param(
        Kind.SQS,
        {"sqs_queue_url": " / "},
        "sqs_queue_url",
        "Enter the queue URL",
        id="sqs-queue-url-of-slash-and-spaces",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_topic_id": "orders"},
        "pubsub_project_id",
        "Enter the ID of the Google Cloud project",
        id="pubsub-project-id",
    ),
    pytest.param(
        Kind.PUBSUB,
        {"pubsub_project_id": "partner-project"},
        "pubsub_topic_id",
        "Enter the topic ID",
        id="pubsub-topic-id",
    ),
    pytest.param(
        Kind.PUBSUB,
        {
            "pubsub_project_id": "partner-project",
            "pubsub_topic_id": "orders",
            "pubsub_ordering": True,
        },
        "pubsub_endpoint",
        "Message ordering needs a regional endpoint",
        id="pubsub-endpoint-for-ordering",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {"servicebus_entity_name": "orders"},
        "servicebus_connection_string",
        "Enter a connection string",
        id="servicebus-connection-string-on-create",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {"connection_string": "  ", "servicebus_entity_name": "orders"},
        "servicebus_connection_string",
        "Enter a connection string",
        id="servicebus-blank-connection-string-on-create",
    ),
    pytest.param(
        Kind.SERVICEBUS,
        {"connection_string": CONNECTION_STRING},
        "servicebus_entity_name",
        "Enter the name of the queue or topic",
        id="servicebus-entity-name-without-entity-path",
    ),
]


@pytest.mark.parametrize(("kind", "values", "field", "fragment"), MISSING)
def test_missing_value_gets_missing_code(
    application: Application,
    kind: str,
    values: dict[str, Any],
    field: str,
    fragment: str,
) -> None:
    error = validation_error(build(application, kind, **values))

    assert field in error.error_dict, error.message_dict
    codes = [item.code for item in error.error_dict[field]]
    assert "missing" in codes
    assert fragment in "\n".join(error.message_dict[field])


def test_errors_of_one_kind_reported_together(application: Application) -> None:
    destination = build(
        application,
        Kind.SQS,
        sqs_queue_url="https://sqs.eu-west-1.amazonaws.com/1234/ord!ers",
        sqs_region="not a region",
        sqs_encryption=SqsEncryption.NONE,
        sqs_kms_key_arn=KEY_ARN,
    )

    errors = validation_error(destination).message_dict

    assert len(errors["sqs_queue_url"]) == 2
    assert "sqs_region" in errors
    assert "sqs_kms_key_arn" in errors


# Connection strings that hold the key or signature and are wrong in other ways,
# several of them mangled so that a secret lands where a name or value is expected.
LEAKY_CONNECTION_STRINGS = [
    pytest.param(
        f"{ENDPOINT};SharedAccessKey={SHARED_ACCESS_KEY}", id="key-without-key-name"
    ),
    pytest.param(
        f"{ENDPOINT};SharedAccessKeyName={SHARED_ACCESS_KEY};SharedAccessKey=",
        id="key-as-key-name",
    ),
    pytest.param(
        f"{ENDPOINT};SharedAccessKeyName=p SharedAccessKey={SHARED_ACCESS_KEY}",
        id="space-for-semicolon",
    ),
    pytest.param(
        f"{ENDPOINT}SharedAccessKeyName=p;SharedAccessKey={SHARED_ACCESS_KEY}",
        id="endpoint-runs-into-key-name",
    ),
    pytest.param(
        f"{ENDPOINT};SharedAccessKeyName=p;{SHARED_ACCESS_KEY}",
        id="key-without-its-name",
    ),
    pytest.param(
        f"{ENDPOINT};SharedAccessKeyName=p;SharedAccessKey {SHARED_ACCESS_KEY}",
        id="space-for-equals",
    ),
    pytest.param(
        f"{ENDPOINT};SharedAccessKeyName=p;SharedAccessKey = {SHARED_ACCESS_KEY}",
        id="spaces-around-equals",
    ),
    pytest.param(
        f"{ENDPOINT};SharedAccessKeyName=p;SharedAccesKey={SHARED_ACCESS_KEY}",
        id="misspelt-key",
    ),
    pytest.param(
        f"{ENDPOINT};SharedAccessKeyName=p;SharedAccessKey={SHARED_ACCESS_KEY} ;",
        id="space-after-key-value",
    ),
    pytest.param(
        f"{ENDPOINT};{CREDENTIALS};SharedAccessKey={SHARED_ACCESS_KEY}x",
        id="duplicate-key",
    ),
    pytest.param(
        f"{ENDPOINT};{CREDENTIALS};EntityPath={SHARED_ACCESS_KEY}#",
        id="key-in-entity-path",
    ),
    pytest.param(
        f"{ENDPOINT};{CREDENTIALS};EntityPath=a{SHARED_ACCESS_KEY.rstrip('=')}?",
        id="unpadded-key-in-entity-path",
    ),
    pytest.param(
        f"{ENDPOINT};{CREDENTIALS};UseDevelopmentEmulator={SHARED_ACCESS_KEY}",
        id="key-as-emulator-flag",
    ),
    pytest.param(
        f"Endpoint=sb://{SHARED_ACCESS_KEY.rstrip('=')}/;{CREDENTIALS}",
        id="key-as-host",
    ),
    pytest.param(f"Endpoint={SHARED_ACCESS_KEY};{CREDENTIALS}", id="key-as-endpoint"),
    pytest.param(
        f"{CONNECTION_STRING};SharedAccessSignature={signature(FUTURE_EXPIRY)}",
        id="key-and-signature",
    ),
    pytest.param(
        f"{ENDPOINT};SharedAccessSignature={signature(PAST_EXPIRY)}",
        id="expired-signature",
    ),
    pytest.param(
        f"{ENDPOINT};SharedAccessSignature=x{signature(FUTURE_EXPIRY)}",
        id="malformed-signature",
    ),
    pytest.param(
        f"Endpoint=sb://short.servicebus.windows.net/;{CREDENTIALS};EntityPath=#",
        id="bad-namespace-and-entity-path",
    ),
    pytest.param(
        f"{ENDPOINT};SharedAccessKeyName={SHARED_ACCESS_KEY};SharedAccessKey=x",
        id="key-as-key-name",
    ),
    pytest.param(
        f"{ENDPOINT};SharedAccessKeyName={SHARED_ACCESS_KEY.rstrip('=')}",
        id="unpadded-key-as-key-name-without-key",
    ),
]


@pytest.mark.parametrize("text", LEAKY_CONNECTION_STRINGS)
def test_error_messages_never_contain_secret(
    application: Application, text: str
) -> None:
    destination = build(application, Kind.SERVICEBUS, connection_string=text)

    messages = "\n".join(validation_error(destination).messages)

    assert messages
    assert SHARED_ACCESS_KEY not in messages
    assert SHARED_ACCESS_KEY.rstrip("=").lower() not in messages.lower()
    assert SIGNATURE_VALUE not in messages
    assert text.strip() not in messages


# A key as Azure generates it: 32 random bytes, 44 characters of base64.
AZURE_SHAPED_KEY = "q1Z9/8F0mW3xV+2nL7bT4cY6hJ0kP5sR9uA3eD1gH2I="


@pytest.mark.parametrize(
    "key_name",
    [
        AZURE_SHAPED_KEY,
        AZURE_SHAPED_KEY.rstrip("="),
        "send " + AZURE_SHAPED_KEY,
        "RootManageSharedAccessKey" * 2,
    ],
    ids=["key", "unpadded-key", "key-after-name", "long-policy-name"],
)
def test_key_name_like_key_rejected(key_name: str) -> None:
    text = (
        f"{ENDPOINT};SharedAccessKeyName={key_name};SharedAccessKey={SHARED_ACCESS_KEY}"
    )

    with pytest.raises(ValidationError) as caught:
        parse_connection_string(text)

    codes = [error.code for error in caught.value.error_list]
    message = caught.value.messages[0]
    assert codes == ["key_in_key_name"]
    assert message.startswith("SharedAccessKeyName (not shown) looks like a key")
    assert "SharedAccessKey." in message
    assert key_name not in message
    assert AZURE_SHAPED_KEY.rstrip("=") not in message


def test_key_name_like_key_without_key_rejected() -> None:
    text = f"{ENDPOINT};SharedAccessKeyName={AZURE_SHAPED_KEY.rstrip('=')}"

    with pytest.raises(ValidationError) as caught:
        parse_connection_string(text)

    assert [error.code for error in caught.value.error_list] == ["key_in_key_name"]


def test_signature_key_name_like_key_rejected() -> None:
    # A token's fields are URL-encoded, so '+' and '/' arrive as %2B and %2F.
    token = signature(FUTURE_EXPIRY).replace(
        "skn=platform-send", f"skn={quote(AZURE_SHAPED_KEY, safe='')}"
    )

    with pytest.raises(ValidationError) as caught:
        parse_connection_string(f"{ENDPOINT};SharedAccessSignature={token}")

    assert [error.code for error in caught.value.error_list] == ["key_in_key_name"]
    assert "q1Z9" not in caught.value.messages[0]


@pytest.mark.parametrize(
    "key_name",
    [
        "RootManageSharedAccessKey",
        "a" * 42,
        "platform-events-send-only-policy-for-partners-and-staff",
    ],
    ids=["default-policy", "42-letters", "long-name-with-hyphens"],
)
def test_key_name_shorter_than_key_accepted(key_name: str) -> None:
    text = (
        f"{ENDPOINT};SharedAccessKeyName={key_name};SharedAccessKey={SHARED_ACCESS_KEY}"
    )

    parsed = parse_connection_string(text)

    assert parsed.key_name == key_name


def test_long_connection_string_rejected_before_parsing() -> None:
    # Thousands of malformed pairs, each of which parsing would report.
    text = ";".join(["x"] * 3000)

    with pytest.raises(ValidationError) as caught:
        parse_connection_string(text)

    assert [error.code for error in caught.value.error_list] == ["too_long"]
    assert "5999 characters long" in caught.value.messages[0]


def test_parse_connection_string_returns_parts() -> None:
    parsed = parse_connection_string(
        "Endpoint=sb://LOCALHOST:5672/;SharedAccessKeyName=K;SharedAccessKey=S;"
        "UseDevelopmentEmulator=true;EntityPath=orders"
    )

    assert parsed.endpoint == "sb://localhost:5672/"
    assert parsed.host == "localhost"
    assert parsed.port == 5672
    assert parsed.namespace == "localhost"
    assert parsed.key_name == "K"
    assert parsed.key == "S"
    assert parsed.shared_access_signature is None
    assert parsed.entity_path == "orders"
    assert parsed.use_development_emulator is True


def test_parse_connection_string_of_cloud_namespace() -> None:
    parsed = parse_connection_string(CONNECTION_STRING)

    assert parsed.endpoint == "sb://partner-events.servicebus.windows.net/"
    assert parsed.namespace == "partner-events"
    assert parsed.port is None
    assert parsed.key == SHARED_ACCESS_KEY
    assert parsed.entity_path is None
    assert parsed.use_development_emulator is False


def test_parsed_connection_string_repr_hides_secrets() -> None:
    with_key = parse_connection_string(CONNECTION_STRING)
    with_signature = parse_connection_string(
        f"{ENDPOINT};SharedAccessSignature={signature(FUTURE_EXPIRY)}"
    )

    assert SHARED_ACCESS_KEY not in repr(with_key)
    assert SIGNATURE_VALUE not in repr(with_signature)


def test_save_encrypts_connection_string(application: Application) -> None:
    destination = build(
        application,
        Kind.SERVICEBUS,
        connection_string=f"{CONNECTION_STRING};EntityPath=orders",
    )
    destination.save()
    destination.refresh_from_db()

    stored = destination.servicebus_connection_string
    assert stored
    assert stored != f"{CONNECTION_STRING};EntityPath=orders"
    assert SHARED_ACCESS_KEY not in stored
    assert destination.connection_string() == f"{CONNECTION_STRING};EntityPath=orders"


def test_blank_connection_string_keeps_stored(application: Application) -> None:
    destination = build(
        application,
        Kind.SERVICEBUS,
        connection_string=f"{CONNECTION_STRING};EntityPath=orders",
    )
    destination.save()
    stored = destination.servicebus_connection_string

    edited = Destination.objects.get(pk=destination.pk)
    edited.set_connection_string("")
    edited.servicebus_sessions = True
    edited.save()
    edited.refresh_from_db()

    assert edited.servicebus_connection_string == stored
    assert edited.servicebus_sessions is True
    assert edited.servicebus_entity_name == "orders"


def test_edit_checks_stored_entity_path(application: Application) -> None:
    destination = build(
        application,
        Kind.SERVICEBUS,
        connection_string=f"{CONNECTION_STRING};EntityPath=orders",
    )
    destination.save()

    edited = Destination.objects.get(pk=destination.pk)
    edited.servicebus_entity_name = "invoices"
    errors = validation_error(edited).message_dict

    assert "differs from EntityPath 'orders'" in "\n".join(
        errors["servicebus_entity_name"]
    )


def test_new_connection_string_replaces_columns(application: Application) -> None:
    destination = build(
        application,
        Kind.SERVICEBUS,
        connection_string=f"{CONNECTION_STRING};EntityPath=orders",
    )
    destination.save()

    edited = Destination.objects.get(pk=destination.pk)
    edited.servicebus_entity_name = ""
    edited.set_connection_string(
        "Endpoint=sb://other-events.servicebus.usgovcloudapi.net/;"
        f"SharedAccessKeyName=sender;SharedAccessKey={SHARED_ACCESS_KEY}"
        ";EntityPath=invoices"
    )
    edited.save()
    edited.refresh_from_db()

    assert edited.servicebus_namespace == "other-events.servicebus.usgovcloudapi.net"
    assert edited.servicebus_key_name == "sender"
    assert edited.servicebus_entity_path == "invoices"
    assert edited.servicebus_entity_name == "invoices"
    assert "other-events" in edited.connection_string()


def test_switching_kind_clears_servicebus_secret(application: Application) -> None:
    destination = build(
        application,
        Kind.SERVICEBUS,
        connection_string=f"{CONNECTION_STRING};EntityPath=orders",
        servicebus_sessions=True,
    )
    destination.save()

    destination.kind = Kind.SQS
    destination.sqs_queue_url = QUEUE_URL
    destination.save()
    destination.refresh_from_db()

    assert destination.servicebus_connection_string == ""
    assert destination.servicebus_namespace == ""
    assert destination.servicebus_key_name == ""
    assert destination.servicebus_entity_path == ""
    assert destination.servicebus_entity_name == ""
    assert destination.servicebus_sessions is False
    assert destination.sqs_region == "eu-west-1"


def test_switching_kind_drops_unsaved_connection_string(
    application: Application,
) -> None:
    destination = build(
        application,
        Kind.PUBSUB,
        connection_string=CONNECTION_STRING,
        pubsub_project_id="partner-project",
        pubsub_topic_id="orders",
        sqs_queue_url=QUEUE_URL,
        sqs_fifo=True,
    )
    destination.save()
    destination.refresh_from_db()

    assert destination.servicebus_connection_string == ""
    assert destination.sqs_queue_url == ""
    assert destination.sqs_fifo is False
    assert destination.pubsub_topic_id == "orders"


# Secrets that staff paste into a plain field by mistake, each with the words that
# name it in the message.
AWS_SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END"
SERVICE_ACCOUNT_KEY = (
    '{"type":"service_account","project_id":"shop-prod","private_key":'
    f'"{PEM_KEY}","client_email":"x@shop-prod.iam.gserviceaccount.com"}}'
)
PASTED_SECRETS = [
    pytest.param(CONNECTION_STRING, "connection string", id="connection-string"),
    pytest.param(SERVICE_ACCOUNT_KEY, "service account key", id="service-account"),
    pytest.param(PEM_KEY, "PEM private key", id="pem"),
    pytest.param(AWS_SECRET_KEY, "AWS secret access key", id="aws-secret-key"),
    pytest.param(SHARED_ACCESS_KEY, "a key", id="shared-access-key"),
]
PLAIN_FIELDS = [
    pytest.param(Kind.SQS, "sqs_queue_url", {}, id="queue-url"),
    pytest.param(Kind.SQS, "sqs_region", {"sqs_queue_url": QUEUE_URL}, id="region"),
    pytest.param(
        Kind.SQS,
        "sqs_kms_key_arn",
        {"sqs_queue_url": QUEUE_URL, "sqs_encryption": SqsEncryption.SSE_KMS},
        id="kms-key-arn",
    ),
    pytest.param(Kind.PUBSUB, "pubsub_topic_id", {"pubsub_project_id": "shop-prod"}),
    pytest.param(Kind.PUBSUB, "pubsub_project_id", {"pubsub_topic_id": "events"}),
    pytest.param(
        Kind.PUBSUB,
        "pubsub_endpoint",
        {"pubsub_project_id": "shop-prod", "pubsub_topic_id": "events"},
    ),
    pytest.param(
        Kind.SERVICEBUS,
        "servicebus_entity_name",
        {"connection_string": CONNECTION_STRING},
        id="entity-name",
    ),
    pytest.param(Kind.SQS, "name", {"sqs_queue_url": QUEUE_URL}, id="name"),
]


@pytest.mark.parametrize(("kind", "field", "values"), PLAIN_FIELDS)
@pytest.mark.parametrize(("secret", "description"), PASTED_SECRETS)
def test_pasted_secret_rejected_unquoted(
    application: Application,
    kind: str,
    field: str,
    values: dict[str, Any],
    secret: str,
    description: str,
) -> None:
    destination = build(application, kind, **{field: secret, **values})

    error = validation_error(destination)
    messages = "\n".join(error.messages)

    assert field in error.message_dict
    assert "is not shown" in "\n".join(error.message_dict[field])
    assert description in "\n".join(error.message_dict[field])
    for fragment in (secret, secret[:20], secret[:20].lower(), SHARED_ACCESS_KEY):
        assert fragment not in messages


def test_pasted_secret_gets_secret_code(application: Application) -> None:
    destination = build(application, Kind.SQS, sqs_queue_url=CONNECTION_STRING)

    codes = [e.code for e in validation_error(destination).error_dict["sqs_queue_url"]]

    assert codes == ["secret_pasted"]


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("bad name!", "must not contain these characters: space, !."),
        ("orders=", "must not contain these characters: =."),
        ("a+b", "must not contain these characters: +."),
        ("caf\u00e9", "must not contain these characters: \u00e9."),
        ("tab\there", "must not contain these characters: U+0009."),
    ],
)
def test_entity_name_outside_azure_characters_rejected(
    application: Application, name: str, shown: str
) -> None:
    destination = build(
        application,
        Kind.SERVICEBUS,
        connection_string=CONNECTION_STRING,
        servicebus_entity_name=name,
    )

    messages = validation_error(destination).message_dict["servicebus_entity_name"]

    assert f"Entity name {name!r} is not valid" in messages[0]
    assert shown in messages[0]


@pytest.mark.parametrize(
    "name", ["orders", "orders.v2", "my_topic-1", "topic/subscriptions/sub"]
)
def test_entity_name_of_azure_characters_accepted(
    application: Application, name: str
) -> None:
    destination = build(
        application,
        Kind.SERVICEBUS,
        connection_string=CONNECTION_STRING,
        servicebus_entity_name=name,
    )

    destination.full_clean()

    assert destination.servicebus_entity_name == name


@pytest.mark.parametrize(
    "url",
    [
        QUEUE_URL,
        f"{QUEUE_URL_PREFIX}PartnerOrderEventsProductionQueue2024",
        f"{QUEUE_URL_PREFIX}{'a1B' * 25}.fifo",
    ],
)
def test_long_queue_url_not_taken_for_secret(
    application: Application, url: str
) -> None:
    fifo = url.endswith(".fifo")
    destination = build(application, Kind.SQS, sqs_queue_url=url, sqs_fifo=fifo)

    destination.full_clean()

    assert destination.sqs_queue_url == url
