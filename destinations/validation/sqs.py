"""Validation of an SQS destination: queue URL, region, FIFO flag and KMS key."""

import re
from collections import defaultdict
from typing import NamedTuple

from django.core.exceptions import ValidationError

from ..models import Destination, SqsEncryption

# An AWS region code such as eu-west-1, us-gov-west-1 or cn-northwest-1. Digits are
# written [0-9] throughout, because \d also matches other scripts' digits.
REGION = r"[a-z]{2}(?:-[a-z]+)+-[0-9]{1,2}"
REGION_RE = re.compile(REGION)

# The host forms SQS has used in queue URLs. The China regions are served under
# amazonaws.com.cn.
QUEUE_HOST_RES = (
    re.compile(rf"sqs\.(?P<region>{REGION})\.amazonaws\.com(?P<china>\.cn)?"),
    re.compile(rf"(?P<region>{REGION})\.queue\.amazonaws\.com(?P<china>\.cn)?"),
)
# The oldest host form carries no region: it is us-east-1's.
LEGACY_QUEUE_HOST = "queue.amazonaws.com"
LEGACY_QUEUE_REGION = "us-east-1"

QUEUE_URL_RE = re.compile(
    r"(?P<scheme>[A-Za-z]+://)?(?P<host>[^/]+)/(?P<account>[^/]+)/(?P<name>[^/]+)"
)
QUEUE_ARN_RE = re.compile(
    rf"arn:aws(?:-cn|-us-gov)?:sqs:(?P<region>{REGION}):(?P<account>[0-9]{{12}}):"
    r"(?P<name>[^:/]+)"
)
ACCOUNT_RE = re.compile(r"[0-9]{12}")
# SQS limits a queue name to 80 characters, the .fifo of a FIFO queue included.
QUEUE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,80}|[A-Za-z0-9_-]{1,75}\.fifo")

KMS_KEY_ID = (
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    # Multi-Region keys.
    r"|mrk-[0-9a-f]{32}"
)
KMS_KEY_ARN_RE = re.compile(
    rf"arn:(?P<partition>aws|aws-cn|aws-us-gov):kms:(?P<region>{REGION}):[0-9]{{12}}:"
    # An alias name is at most 256 characters, "alias/" included.
    rf"(?:key/(?:{KMS_KEY_ID})|alias/[A-Za-z0-9/_-]{{1,250}})"
)

EXAMPLE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders"
EXAMPLE_KEY_ARN = (
    "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
)

# Per field, the value to enter instead of a secret pasted there by mistake.
PASTE_HINTS = {
    "sqs_queue_url": (
        "Paste the queue URL, https://sqs.REGION.amazonaws.com/ACCOUNT/NAME, from the "
        "queue's details in the SQS console."
    ),
    "sqs_region": "Enter a region code such as eu-west-1, or leave the region blank.",
    "sqs_kms_key_arn": (
        f"Paste the KMS key's ARN from the KMS console, such as {EXAMPLE_KEY_ARN}."
    ),
}


class QueueUrl(NamedTuple):
    region: str
    account: str
    name: str
    url: str

    @property
    def is_fifo(self) -> bool:
        return self.name.endswith(".fifo")


def partition_of(region: str) -> str:
    """Return the AWS partition that serves `region`, as ARNs spell it."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def url_for(region: str, account: str, name: str) -> str:
    suffix = ".cn" if partition_of(region) == "aws-cn" else ""
    return f"https://sqs.{region}.amazonaws.com{suffix}/{account}/{name}"


def parse_queue_url(url: str) -> QueueUrl:
    """Split an SQS queue URL into region, account and queue name.

    Raise ValidationError with one message per wrong part. The URL returned has its
    scheme and host in lowercase.
    """
    arn = QUEUE_ARN_RE.fullmatch(url)
    if arn:
        raise ValidationError(
            f"{url!r} is the queue's ARN, not its URL. Enter the URL instead: "
            f"{url_for(arn['region'], arn['account'], arn['name'])}.",
            code="arn_not_url",
        )

    match = QUEUE_URL_RE.fullmatch(url)
    if not match:
        raise ValidationError(
            f"{url!r} is not an SQS queue URL. Copy the URL from the queue's details "
            f"in the SQS console; it looks like {EXAMPLE_URL}.",
            code="invalid_url",
        )

    errors = []
    scheme = (match["scheme"] or "").lower()
    if scheme != "https://":
        errors.append(
            ValidationError(
                f"Queue URL {url!r} must start with https://, as the SQS console "
                f"shows it: for example {EXAMPLE_URL}.",
                code="invalid_scheme",
            )
        )

    host = match["host"].lower()
    account = match["account"]
    name = match["name"]
    region = ""
    try:
        region = region_of_host(host, url)
    except ValidationError as error:
        errors.append(error)

    if not ACCOUNT_RE.fullmatch(account):
        errors.append(
            ValidationError(
                f"Account {account!r} in queue URL {url!r} is not an AWS account ID, "
                "which has 12 digits. Copy the queue URL again from the SQS console.",
                code="invalid_account",
            )
        )
    if not QUEUE_NAME_RE.fullmatch(name):
        errors.append(
            ValidationError(
                f"Queue name {name!r} in queue URL {url!r} is not valid. A queue name "
                "has 1 to 80 letters, digits, hyphens or underscores. A FIFO queue "
                "name has at most 75 of them followed by .fifo.",
                code="invalid_queue_name",
            )
        )

    if errors:
        raise ValidationError(errors)
    return QueueUrl(region, account, name, f"https://{host}/{account}/{name}")


def region_of_host(host: str, url: str) -> str:
    """Return the region of an SQS endpoint host.

    Raise ValidationError if `host` is no SQS endpoint or uses the wrong domain for
    its partition.
    """
    if host == LEGACY_QUEUE_HOST:
        return LEGACY_QUEUE_REGION

    for pattern in QUEUE_HOST_RES:
        match = pattern.fullmatch(host)
        if match is None:
            continue
        region = match["region"]
        in_china = partition_of(region) == "aws-cn"
        if in_china != bool(match["china"]):
            domain = "amazonaws.com.cn" if in_china else "amazonaws.com"
            raise ValidationError(
                f"Host {host!r} in queue URL {url!r} does not exist: region "
                f"{region} is served under {domain}. Copy the queue URL again from "
                "the SQS console.",
                code="invalid_host",
            )
        return region

    raise ValidationError(
        f"Host {host!r} in queue URL {url!r} is not an SQS endpoint. Expected "
        "sqs.REGION.amazonaws.com (amazonaws.com.cn in China), "
        "REGION.queue.amazonaws.com or queue.amazonaws.com, as in "
        f"{EXAMPLE_URL}.",
        code="invalid_host",
    )


def validate(destination: Destination) -> None:
    """Normalise and check the SQS columns of `destination`."""
    errors: dict[str, list[ValidationError]] = defaultdict(list)

    destination.sqs_queue_url = (destination.sqs_queue_url or "").strip().rstrip("/")
    destination.sqs_region = (destination.sqs_region or "").strip().lower()
    destination.sqs_kms_key_arn = (destination.sqs_kms_key_arn or "").strip()

    queue = None
    if not destination.sqs_queue_url:
        errors["sqs_queue_url"].append(
            ValidationError(
                "Enter the queue URL from the queue's details in the SQS console, "
                f"for example {EXAMPLE_URL}.",
                code="missing",
            )
        )
    else:
        try:
            queue = parse_queue_url(destination.sqs_queue_url)
        except ValidationError as error:
            errors["sqs_queue_url"].extend(error.error_list)
        else:
            destination.sqs_queue_url = queue.url

    region_error = check_region(destination, queue)
    if region_error:
        errors["sqs_region"].append(region_error)
    if queue is not None:
        fifo_error = check_fifo(destination, queue)
        if fifo_error:
            errors["sqs_fifo"].append(fifo_error)
    key_error = check_kms_key(destination, queue)
    if key_error:
        errors["sqs_kms_key_arn"].append(key_error)

    if errors:
        raise ValidationError(dict(errors))


def check_region(
    destination: Destination, queue: QueueUrl | None
) -> ValidationError | None:
    """Fill a blank region from the queue URL, or check it against the URL."""
    region = destination.sqs_region
    if region and not REGION_RE.fullmatch(region):
        return ValidationError(
            f"{region!r} is not an AWS region code. Enter a code such as eu-west-1, "
            "or leave the region blank to take it from the queue URL.",
            code="invalid_region",
        )
    if queue is None:
        return None

    if not region:
        destination.sqs_region = queue.region
    elif region != queue.region:
        return ValidationError(
            f"Region {region!r} differs from the queue URL's region "
            f'{queue.region!r}. A client in the wrong region gets "queue does not '
            'exist" from SQS. Clear the region to take it from the URL, or correct '
            "the URL.",
            code="region_mismatch",
        )
    return None


def check_fifo(destination: Destination, queue: QueueUrl) -> ValidationError | None:
    if queue.is_fifo and not destination.sqs_fifo:
        return ValidationError(
            f"Queue {queue.name!r} is a FIFO queue, because its name ends in .fifo. "
            "Tick FIFO queue, so that events are sent with a MessageGroupId per "
            "object as a FIFO queue requires.",
            code="fifo_mismatch",
        )
    if destination.sqs_fifo and not queue.is_fifo:
        return ValidationError(
            f"FIFO queue is ticked, but queue {queue.name!r} is a standard queue, "
            "because only FIFO queue names end in .fifo. Untick FIFO queue, or enter "
            "the URL of a FIFO queue.",
            code="fifo_mismatch",
        )
    return None


def check_kms_key(
    destination: Destination, queue: QueueUrl | None
) -> ValidationError | None:
    arn = destination.sqs_kms_key_arn
    if not arn:
        return None

    if destination.sqs_encryption != SqsEncryption.SSE_KMS:
        return ValidationError(
            f"KMS key ARN {arn!r} is only used with SSE-KMS, but server-side "
            f"encryption is {destination.get_sqs_encryption_display()!r}. Choose "
            "SSE-KMS, or clear the KMS key ARN.",
            code="kms_key_without_sse_kms",
        )

    if "alias/aws/" in arn:
        # Aliases under aws/ name AWS managed keys, whose key policy only AWS can
        # change, so no other account can be granted use of them.
        return ValidationError(
            f"{arn!r} is an AWS managed key (alias/aws/sqs), which cannot be used "
            "across accounts, so the platform could never send to the queue. "
            "Encrypt the queue with a customer managed KMS key and enter that "
            "key's ARN.",
            code="aws_managed_kms_key",
        )

    match = KMS_KEY_ARN_RE.fullmatch(arn)
    if match is None:
        return ValidationError(
            f"{arn!r} is not a KMS key ARN. Copy the key's ARN from the KMS console, "
            f"such as {EXAMPLE_KEY_ARN}, or an alias ARN ending in alias/NAME.",
            code="invalid_kms_key_arn",
        )

    key_region = match["region"]
    if match["partition"] != partition_of(key_region):
        return ValidationError(
            f"KMS key ARN {arn!r} names region {key_region}, whose ARNs start with "
            f"arn:{partition_of(key_region)}:kms. Copy the ARN again from the KMS "
            "console.",
            code="invalid_kms_key_arn",
        )
    if queue is not None and key_region != queue.region:
        # KMS keys never leave their region, and SQS uses KMS in its own region.
        return ValidationError(
            f"KMS key ARN {arn!r} is in region {key_region}, but the queue is in "
            f"{queue.region}. SQS can only use a key of the queue's own region: "
            "enter the ARN of that key.",
            code="kms_key_region_mismatch",
        )
    return None
