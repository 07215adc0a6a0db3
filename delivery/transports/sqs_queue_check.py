"""The SQS check of a destination: the queue's attributes, read with
GetQueueAttributes(All), compared with the destination's settings."""

import re
from dataclasses import dataclass

from destinations.models import Destination, SqsEncryption

from .base import CheckResult

# KmsMasterKeyId holds a key ID, a key ARN, an alias name or an alias ARN
# (SetQueueAttributes in the SQS API reference).
_KMS_ARN = re.compile(
    r"arn:[a-z-]+:kms:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    r"(?P<resource>(?:key|alias)/.+)"
)
# The AWS managed key for SQS. Only AWS can change its key policy, so no other
# account can be allowed to use it.
AWS_MANAGED_SQS_KEY = "alias/aws/sqs"


@dataclass(frozen=True)
class KmsKey:
    """A KMS key as KmsMasterKeyId or a destination's KMS key ARN names it."""

    # "key" for a key ID or key ARN, "alias" for an alias name or alias ARN.
    form: str
    # The key ID, or the alias name with its "alias/" prefix.
    name: str
    region: str = ""
    account: str = ""

    @classmethod
    def parse(cls, value: str) -> "KmsKey":
        match = _KMS_ARN.fullmatch(value)
        resource = match["resource"] if match else value
        if resource.startswith("alias/"):
            form, name = "alias", resource
        else:
            form, name = "key", resource.removeprefix("key/")
        if match is None:
            return cls(form, name)
        return cls(form, name, match["region"], match["account"])

    def same_key(self, other: "KmsKey") -> bool | None:
        """Return whether both name the same key, or None when names alone cannot
        tell: an alias and a key ID, or two aliases, may name one key."""
        for mine, theirs in (
            (self.region, other.region),
            (self.account, other.account),
        ):
            if mine and theirs and mine != theirs:
                return False
        if self.form == other.form == "key":
            return self.name == other.name
        if self.form == other.form and self.name == other.name:
            return True
        return None

    @property
    def aws_managed(self) -> bool:
        return self.form == "alias" and self.name == AWS_MANAGED_SQS_KEY


class QueueCheck:
    """Compares a queue's attributes, from GetQueueAttributes(All), with the
    destination that sends to it."""

    def __init__(self, destination: Destination, attributes: dict[str, str]) -> None:
        self.destination = destination
        self.attributes = attributes
        self.queue_url = destination.sqs_queue_url
        self.findings: list[str] = []
        self.mismatches: list[str] = []

    def max_message_size(self) -> int | None:
        try:
            return int(self.attributes["MaximumMessageSize"])
        except (KeyError, ValueError):
            return None

    def result(self) -> CheckResult:
        self.findings.append(
            f"The platform's {self.destination.stage} AWS principal read the "
            f"attributes of queue {self.queue_url}. That does not prove it may send: "
            "only a test event checks sqs:SendMessage."
        )
        self._size()
        self._fifo()
        self._encryption()
        return CheckResult(
            ok=not self.mismatches,
            findings=self.findings,
            mismatches=self.mismatches,
        )

    def _size(self) -> None:
        size = self.max_message_size()
        if size is None:
            self.findings.append("The queue did not report its MaximumMessageSize.")
        else:
            self.findings.append(f"MaximumMessageSize is {size:,} bytes.")

    def _fifo(self) -> None:
        queue_fifo = self.attributes.get("FifoQueue", "false").lower() == "true"
        self.findings.append(f"FifoQueue is {str(queue_fifo).lower()}.")
        if queue_fifo:
            deduplication = self.attributes.get("ContentBasedDeduplication", "false")
            self.findings.append(
                f"ContentBasedDeduplication is {deduplication.lower()}. The platform "
                "sends the event ID as MessageDeduplicationId either way."
            )
        if self.destination.sqs_fifo == queue_fifo:
            return
        if queue_fifo:
            fix = (
                "Tick FIFO queue, so that events carry the MessageGroupId a FIFO "
                "queue requires."
            )
        else:
            fix = "Untick FIFO queue, or enter the URL of a FIFO queue."
        self.mismatches.append(
            f"FIFO queue is {'ticked' if self.destination.sqs_fifo else 'unticked'} "
            f"here, but queue {self.queue_url} has FifoQueue "
            f"{str(queue_fifo).lower()}. {fix}"
        )

    def _encryption(self) -> None:
        key_id = self.attributes.get("KmsMasterKeyId", "")
        sse_sqs = self.attributes.get("SqsManagedSseEnabled", "").lower() == "true"
        # A KmsMasterKeyId decides: moto reports SqsManagedSseEnabled true next to
        # it, which SQS itself does not.
        if key_id:
            queue_choice = SqsEncryption.SSE_KMS
            queue_text = f"SSE-KMS with KmsMasterKeyId {key_id}"
            self.findings.append(f"KmsMasterKeyId is {key_id}.")
        elif sse_sqs:
            queue_choice = SqsEncryption.SSE_SQS
            queue_text = "SSE-SQS (SqsManagedSseEnabled is true)"
            self.findings.append(
                "SqsManagedSseEnabled is true: SQS encrypts messages with a key it "
                "manages, which needs no grant."
            )
        else:
            queue_choice = SqsEncryption.NONE
            queue_text = "no server-side encryption"
            self.findings.append(
                "The queue has no server-side encryption: it reports no "
                "KmsMasterKeyId and SqsManagedSseEnabled is not true."
            )

        queue_key = KmsKey.parse(key_id) if key_id else None
        if queue_key is not None and queue_key.aws_managed:
            self.mismatches.append(
                f"Queue {self.queue_url} is encrypted with the AWS managed key "
                f"{AWS_MANAGED_SQS_KEY}, which cannot be used across accounts, so "
                "the platform's sends will fail. Encrypt the queue with a customer "
                "managed KMS key, or with SSE-SQS, and set this destination to match."
            )

        chosen = self.destination.sqs_encryption
        if chosen != queue_choice:
            fixes = {
                SqsEncryption.SSE_KMS: (
                    "Choose SSE-KMS and enter the key's ARN, then allow the platform "
                    "to use the key as What to grant shows."
                ),
                SqsEncryption.SSE_SQS: (
                    "Choose SSE-SQS; sending to such a queue needs no key grant."
                ),
                SqsEncryption.NONE: "Choose None, or turn on encryption for the queue.",
            }
            self.mismatches.append(
                f"Server-side encryption is "
                f"{self.destination.get_sqs_encryption_display()!r} here, but queue "
                f"{self.queue_url} uses {queue_text}. {fixes[queue_choice]}"
            )
        elif queue_key is not None:
            self._kms_key(key_id, queue_key)

    def _kms_key(self, key_id: str, queue_key: KmsKey) -> None:
        arn = self.destination.sqs_kms_key_arn
        if not arn:
            self.findings.append(
                f"This destination has no KMS key ARN. Enter the ARN of {key_id}, so "
                "that What to grant names the key."
            )
        else:
            same = KmsKey.parse(arn).same_key(queue_key)
            if same is False:
                self.mismatches.append(
                    f"KMS key ARN is {arn} here, but queue {self.queue_url} has "
                    f"KmsMasterKeyId {key_id}. Enter the ARN of the queue's key, so "
                    "that the key policy grant goes to the key the queue uses."
                )
            elif same is None:
                self.findings.append(
                    f"The queue's KmsMasterKeyId is {key_id} and this destination "
                    f"names {arn}. An alias and a key ID can name the same key, "
                    "which this check cannot confirm without access to KMS: compare "
                    "them in the KMS console."
                )
        self.findings.append(
            "Whether the key policy allows the platform kms:GenerateDataKey and "
            "kms:Decrypt shows only when sending: send a test event to check."
        )
