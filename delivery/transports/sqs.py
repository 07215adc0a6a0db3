"""Sending to AWS SQS standard and FIFO queues with boto3.

Each stage sends with its own AWS identity (settings.STAGE_IDENTITIES), so a queue
trusts TEST and PROD separately. Failures come back as `Failure` values whose message
names the queue URL and the stage and states what to grant or change.
"""

import hashlib
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from django.conf import settings

from destinations.models import Destination, Kind

from . import register
from .base import (
    Blame,
    CheckResult,
    Failure,
    OutgoingMessage,
    Result,
    Sent,
    Transport,
)
from .sqs_queue_check import QueueCheck

logger = logging.getLogger(__name__)

# SQS's MaximumMessageSize default, used when the queue's own value cannot be read.
DEFAULT_MAX_MESSAGE_SIZE = 262_144
# The smallest MaximumMessageSize a queue can have, so smaller messages always fit
# (SetQueueAttributes in the SQS API reference).
MIN_MAX_MESSAGE_SIZE = 1_024
# The largest MaximumMessageSize SQS allows since August 2025.
MAX_MAX_MESSAGE_SIZE = 1_048_576
MAX_MESSAGE_SIZE_CACHE_SECONDS = 600.0
# SendMessageBatch takes at most 10 entries. Their total size is capped as well, at
# 262,144 bytes before SQS raised its maximum message size to 1 MiB. Batches stay
# under that older cap, so they fit wherever the raise has not reached.
MAX_BATCH_ENTRIES = 10
MAX_BATCH_BYTES = 262_144

# A message of a send: its position in the call, its SendMessage entry, its size.
Entry = tuple[int, dict[str, Any], int]

# The retries botocore makes itself, the first call included; the delivery engine
# owns every retry after that.
TOTAL_MAX_ATTEMPTS = 2
MAX_AWS_MESSAGE_LENGTH = 500

# MessageGroupId and MessageDeduplicationId: 1 to 128 alphanumerics and ASCII
# punctuation, which together are the printable ASCII characters except the space.
_FIFO_ID = re.compile(r"[\x21-\x7e]{1,128}")
# The characters outside the set SQS allows in a message body (SendMessage in the SQS
# API reference). SQS rejects them, or in newer releases replaces them with U+FFFD.
_INVALID_BODY_CHARACTER = re.compile(
    "[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)
# https://sqs.REGION.amazonaws.com/... and the legacy https://REGION.queue.amazonaws.com/
_QUEUE_URL_REGION = re.compile(
    r"^https://(?:sqs\.([a-z0-9-]+)|([a-z0-9-]+)\.queue)\.amazonaws\.com(?:\.cn)?/"
)

_NOT_FOUND_CODES = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
_ACCESS_DENIED_CODES = {"AccessDenied", "AccessDeniedException"}
# These mean the platform's own credentials were rejected, not the queue's policy.
_CREDENTIAL_CODES = {
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
}
_KMS_ACCESS_CODES = {"KMS.AccessDeniedException", "KmsAccessDenied"}
_KMS_KEY_CODES = {
    "KMS.DisabledException",
    "KmsDisabled",
    "KMS.NotFoundException",
    "KmsNotFound",
    "KMS.InvalidStateException",
    "KmsInvalidState",
    "KmsInvalidKeyUsage",
    "KmsOptInRequired",
}
_KMS_THROTTLED_CODES = {"KmsThrottled", "KMS.ThrottlingException"}
_THROTTLED_CODES = {
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestThrottledException",
    "OverLimit",
}
_SERVICE_ERROR_CODES = {"InternalError", "InternalFailure", "ServiceUnavailable"}
_TOO_LARGE_CODES = {"MessageTooLong", "BatchRequestTooLong"}
_INVALID_MESSAGE_CODES = {"InvalidMessageContents"}
_TOO_LONG_TEXT = re.compile(r"too long|shorter than|exceeds the (maximum|limit)", re.I)

_clients: dict[tuple[str, ...], Any] = {}
_clients_lock = threading.Lock()


@dataclass(frozen=True)
class _SizeLimit:
    """A queue's MaximumMessageSize, or the default when the platform may not read
    it, cached until `expires` (time.monotonic())."""

    size: int
    assumed: bool
    expires: float


# Keyed by (endpoint URL, queue URL).
_size_limits: dict[tuple[str, str], _SizeLimit] = {}


def fifo_id(value: str) -> str:
    """Map `value` to a valid MessageGroupId or MessageDeduplicationId.

    A value SQS would reject (empty, longer than 128 characters, or with a character
    outside printable ASCII) becomes "sha256-" and its hex digest, so the same object
    key always lands in the same message group.
    """
    if _FIFO_ID.fullmatch(value):
        return value
    return "sha256-" + hashlib.sha256(value.encode()).hexdigest()


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def message_size(entry: dict[str, Any]) -> int:
    """Return the size SQS counts for `entry`: the UTF-8 bytes of the body and of each
    message attribute's name, data type and value."""
    size = len(entry["MessageBody"].encode())
    for name, attribute in entry.get("MessageAttributes", {}).items():
        size += len(name.encode())
        size += len(attribute["DataType"].encode())
        size += len(attribute["StringValue"].encode())
    return size


def queue_region(destination: Destination) -> str:
    """Return the destination's region, or the one in its queue URL, or ""."""
    if destination.sqs_region:
        return destination.sqs_region
    match = _QUEUE_URL_REGION.match(destination.sqs_queue_url)
    if match is None:
        return ""
    return match.group(1) or match.group(2)


def classify_error(error: Exception, destination: Destination) -> Failure:
    """Return the failure that a boto3 exception from sending to `destination` means."""
    identity = _Identity.for_stage(destination.stage)
    errors = _Errors(destination, identity, queue_region(destination))
    return errors.from_exception(error)


@dataclass(frozen=True)
class _Identity:
    """The AWS identity and endpoint one stage sends with."""

    stage: str
    access_key_id: str
    secret_access_key: str
    profile: str
    endpoint_url: str

    @classmethod
    def for_stage(cls, stage: str) -> "_Identity":
        values = settings.STAGE_IDENTITIES.get(stage, {})
        return cls(
            stage=stage,
            access_key_id=values.get("aws_access_key_id", ""),
            secret_access_key=values.get("aws_secret_access_key", ""),
            profile=values.get("aws_profile", ""),
            endpoint_url=values.get("sqs_endpoint_url", ""),
        )

    def cache_key(self, region: str) -> tuple[str, ...]:
        # A digest, so a rotated secret gets a new client without the secret itself
        # being kept in one more place.
        secret_digest = hashlib.sha256(self.secret_access_key.encode()).hexdigest()
        return (
            self.stage,
            self.access_key_id,
            secret_digest,
            self.profile,
            self.endpoint_url,
            region,
        )

    def redact(self, text: str) -> str:
        """Remove this identity's keys from `text`, such as an AWS error message."""
        for secret in (self.secret_access_key, self.access_key_id):
            if secret:
                text = text.replace(secret, "[redacted]")
        return text


def _client(identity: _Identity, region: str) -> Any:
    """Return this process's SQS client for `identity` in `region`, creating it once.

    botocore clients are thread-safe, but creating sessions is not, hence the lock.
    """
    key = identity.cache_key(region)
    with _clients_lock:
        client = _clients.get(key)
        if client is not None:
            return client

        if identity.access_key_id and identity.secret_access_key:
            session = boto3.session.Session(
                aws_access_key_id=identity.access_key_id,
                aws_secret_access_key=identity.secret_access_key,
            )
        elif identity.profile:
            session = boto3.session.Session(profile_name=identity.profile)
        else:
            session = boto3.session.Session()
        config = Config(
            connect_timeout=settings.SQS_TIMEOUT,
            read_timeout=settings.SQS_TIMEOUT,
            retries={"mode": "standard", "total_max_attempts": TOTAL_MAX_ATTEMPTS},
        )
        client = session.client(
            "sqs",
            region_name=region,
            endpoint_url=identity.endpoint_url or None,
            config=config,
        )
        _clients[key] = client
        return client


@register
class SqsTransport(Transport):
    kind = Kind.SQS

    def send(self, messages: Sequence[OutgoingMessage]) -> list[Result]:
        results: list[Result | None] = [None] * len(messages)
        identity = _Identity.for_stage(self.destination.stage)
        region = queue_region(self.destination)
        errors = _Errors(self.destination, identity, region)
        if not region:
            return [errors.unknown_region()] * len(messages)
        try:
            client = _client(identity, region)
        except ProfileNotFound as error:
            return [errors.platform_settings(error)] * len(messages)

        entries: list[Entry] = []
        for index, message in enumerate(messages):
            entry_or_failure = self._entry(message, errors)
            if isinstance(entry_or_failure, Failure):
                results[index] = entry_or_failure
            else:
                size = message_size(entry_or_failure)
                entries.append((index, entry_or_failure, size))

        largest = max((size for _, _, size in entries), default=0)
        limit = self._size_limit(client, identity, errors, largest)
        if limit is not None:
            for index, _, size in entries:
                if size > limit.size:
                    results[index] = errors.too_large(size, limit)
            entries = [item for item in entries if item[2] <= limit.size]

        if self.destination.sqs_fifo:
            by_group = _OnePerGroup(entries)
            for batch in by_group:
                by_group.after(batch, self._send_into(client, batch, errors, results))
            for index, failure in by_group.not_sent.items():
                results[index] = failure
        else:
            batches = list(_batches(entries))
            for number, batch in enumerate(batches):
                stop = _whole_call_failure(
                    self._send_into(client, batch, errors, results)
                )
                if stop is not None:
                    for index, _, _ in chain.from_iterable(batches[number + 1 :]):
                        results[index] = stop
                    break

        return [
            errors.missing_batch_result() if result is None else result
            for result in results
        ]

    def _entry(
        self, message: OutgoingMessage, errors: "_Errors"
    ) -> dict[str, Any] | Failure:
        """Build one SendMessage request entry, or the reason it cannot be sent."""
        try:
            body = message.body.decode()
        except UnicodeDecodeError as error:
            return errors.invalid_body(f"it is not valid UTF-8 ({error.reason})")
        # The body is JSON, and those characters (U+FFFE and U+FFFF, because JSON
        # already escapes control characters) can only sit inside its strings. A
        # \u escape sends the same data in characters SQS accepts.
        body = _INVALID_BODY_CHARACTER.sub(_json_escape, body)

        attributes = {}
        for name, value in (
            ("event_id", message.event_id),
            ("event_type", message.event_type),
        ):
            # SQS rejects an attribute with an empty value.
            if value:
                attributes[name] = {"DataType": "String", "StringValue": value}
        entry: dict[str, Any] = {"MessageBody": body, "MessageAttributes": attributes}
        if self.destination.sqs_fifo:
            entry["MessageGroupId"] = fifo_id(message.object_key)
            entry["MessageDeduplicationId"] = fifo_id(message.event_id)
        return entry

    def _size_limit(
        self, client: Any, identity: _Identity, errors: "_Errors", largest: int
    ) -> _SizeLimit | None:
        """Return the queue's MaximumMessageSize, read with GetQueueAttributes and
        cached, or None when it is unknown and SQS should judge the size itself.

        SQS counts UTF-8 bytes; moto counts characters, so this check is the only one
        that holds when sending to moto.
        """
        if largest <= MIN_MAX_MESSAGE_SIZE:
            return None
        queue_url = self.destination.sqs_queue_url
        key = (identity.endpoint_url, queue_url)
        cached = _size_limits.get(key)
        if cached is not None and cached.expires > time.monotonic():
            return cached

        try:
            response = client.get_queue_attributes(
                QueueUrl=queue_url, AttributeNames=["MaximumMessageSize"]
            )
            size = int(response["Attributes"]["MaximumMessageSize"])
            assumed = False
        except (ClientError, NoCredentialsError) as error:
            failure = errors.from_exception(error)
            if failure.kind != "access_denied":
                # A missing queue or an outage: the send itself will report it.
                return None
            # The platform may have only sqs:SendMessage on the queue, so use the
            # default limit and cache it like a value read from the queue.
            logger.info(
                "Cannot read MaximumMessageSize for destination %s (%s); assuming %d "
                "bytes",
                self.destination.pk,
                failure.kind,
                DEFAULT_MAX_MESSAGE_SIZE,
            )
            size = DEFAULT_MAX_MESSAGE_SIZE
            assumed = True
        except (BotoCoreError, KeyError, ValueError):
            return None

        expires = time.monotonic() + MAX_MESSAGE_SIZE_CACHE_SECONDS
        limit = _SizeLimit(size=size, assumed=assumed, expires=expires)
        _size_limits[key] = limit
        return limit

    def _send_into(
        self,
        client: Any,
        batch: list[Entry],
        errors: "_Errors",
        results: list[Result | None],
    ) -> list[Result]:
        """Send `batch` in one call, store its results by message index in
        `results`, and return them in the batch's order."""
        batch_results = self._send_batch(
            client, [entry for _, entry, _ in batch], errors
        )
        for (index, _, _), result in zip(batch, batch_results, strict=True):
            results[index] = result
        return batch_results

    def _send_batch(
        self, client: Any, entries: list[dict[str, Any]], errors: "_Errors"
    ) -> list[Result]:
        if len(entries) == 1:
            return [self._send_one(client, entries[0], errors)]

        request = [
            {"Id": str(position), **entry} for position, entry in enumerate(entries)
        ]
        try:
            response = client.send_message_batch(
                QueueUrl=self.destination.sqs_queue_url, Entries=request
            )
        except (ClientError, BotoCoreError) as error:
            failure = errors.from_exception(error)
            if failure.permanent and failure.blame != Blame.DESTINATION:
                # One bad entry fails the whole call (always on FIFO queues), so
                # send each alone to fail only the bad one.
                return [self._send_one(client, entry, errors) for entry in entries]
            return [failure] * len(entries)

        results: list[Result] = [
            errors.missing_batch_result() for _ in range(len(entries))
        ]
        for success in response.get("Successful", []):
            results[int(success["Id"])] = Sent(remote_message_id=success["MessageId"])
        for failed in response.get("Failed", []):
            results[int(failed["Id"])] = errors.from_code(
                failed.get("Code", ""),
                400 if failed.get("SenderFault") else 500,
                failed.get("Message", ""),
            )
        return results

    def _send_one(
        self, client: Any, entry: dict[str, Any], errors: "_Errors"
    ) -> Result:
        try:
            response = client.send_message(
                QueueUrl=self.destination.sqs_queue_url, **entry
            )
        except (ClientError, BotoCoreError) as error:
            return errors.from_exception(error)
        return Sent(remote_message_id=response["MessageId"])

    def check(self) -> CheckResult:
        """Read the queue's attributes with the stage's identity and compare them
        with this destination, sending nothing. The MaximumMessageSize read also
        refreshes the cached limit that `send` checks messages against."""
        identity = _Identity.for_stage(self.destination.stage)
        region = queue_region(self.destination)
        errors = _Errors(self.destination, identity, region)
        if not region:
            return CheckResult(ok=False, failure=errors.unknown_region())
        try:
            client = _client(identity, region)
        except ProfileNotFound as error:
            return CheckResult(ok=False, failure=errors.platform_settings(error))

        queue_url = self.destination.sqs_queue_url
        try:
            response = client.get_queue_attributes(
                QueueUrl=queue_url, AttributeNames=["All"]
            )
        except (ClientError, BotoCoreError) as error:
            credential_code = _credential_error_code(error)
            if credential_code:
                failure = errors.bad_credentials(credential_code)
            else:
                failure = errors.from_exception(error)
            logger.info(
                "Checking destination %s: GetQueueAttributes failed (%s)",
                self.destination.pk,
                failure.kind,
            )
            if failure.kind == "access_denied" and not credential_code:
                return CheckResult(ok=False, findings=[_attributes_denied(errors)])
            return CheckResult(ok=False, failure=failure)

        attributes: dict[str, str] = response.get("Attributes", {})
        check = QueueCheck(self.destination, attributes)
        size = check.max_message_size()
        if size is not None:
            expires = time.monotonic() + MAX_MESSAGE_SIZE_CACHE_SECONDS
            _size_limits[(identity.endpoint_url, queue_url)] = _SizeLimit(
                size=size, assumed=False, expires=expires
            )
        return check.result()


def _batches(entries: list[Entry]) -> Iterator[list[Entry]]:
    """Split `entries`, kept in order, into SendMessageBatch-sized groups."""
    batch: list[Entry] = []
    total = 0
    for item in entries:
        size = item[2]
        full = len(batch) == MAX_BATCH_ENTRIES or total + size > MAX_BATCH_BYTES
        if batch and full:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size
    if batch:
        yield batch


class _OnePerGroup:
    """Splits a FIFO queue's entries into SendMessageBatch calls that each carry at
    most one entry per message group, the group's earliest unsent one.

    SendMessageBatch reports each entry on its own, so two entries of a group in one
    call could see the later one accepted after the earlier one failed. After each
    call, `after` takes its results: a failure that is not the message's own (an
    outage, access denied) ends the group for this send, and its remaining entries
    go into `not_sent` with that failure.

    Each call takes the groups with the most entries left first. A claim brings
    each key's run in one piece, so taking groups in the order they came would fill
    calls from the first ten groups until they ran out, and then send the rest of
    the groups a few entries per call. Longest first (Hu's rule for chains of equal
    tasks) takes the fewest calls: the longest group's length, or the entries over
    ten, whichever is more. SQS charges per call.
    """

    def __init__(self, entries: list[Entry]) -> None:
        self.lines: dict[str, deque[Entry]] = {}
        for item in entries:
            self.lines.setdefault(item[1]["MessageGroupId"], deque()).append(item)
        self.not_sent: dict[int, Failure] = {}

    def __iter__(self) -> Iterator[list[Entry]]:
        while self.lines:
            batch: list[Entry] = []
            total = 0
            # A stable sort: among groups of one length, the first to come goes first.
            longest_first = sorted(self.lines.items(), key=lambda pair: -len(pair[1]))
            for group, line in longest_first:
                if len(batch) == MAX_BATCH_ENTRIES:
                    break
                size = line[0][2]
                if batch and total + size > MAX_BATCH_BYTES:
                    continue
                batch.append(line.popleft())
                total += size
                if not line:
                    del self.lines[group]
            # In the order of the messages, as the caller gave them.
            batch.sort(key=itemgetter(0))
            yield batch

    def after(self, batch: list[Entry], results: list[Result]) -> None:
        whole_call = _whole_call_failure(results)
        if whole_call is not None:
            stopped = {group: whole_call for group in self.lines}
        else:
            stopped = {
                entry["MessageGroupId"]: result
                for (_, entry, _), result in zip(batch, results, strict=True)
                if isinstance(result, Failure) and result.blame != Blame.MESSAGE
            }
        for group, failure in stopped.items():
            for index, _, _ in self.lines.pop(group, ()):
                self.not_sent[index] = failure


def _whole_call_failure(results: list[Result]) -> Failure | None:
    """Return the failure when every entry of a call failed the same way, for a
    reason that is not its own (an outage, throttling, access denied), else None.

    The calls after it would most likely fail the same way, each after its own
    timeouts, and a send of many calls could outlast the engine's lease.
    """
    first = results[0] if results else None
    if not isinstance(first, Failure) or first.blame == Blame.MESSAGE:
        return None
    if all(result == first for result in results):
        return first
    return None


class _Errors:
    """Turns SQS errors into failures that name the queue URL and the stage."""

    def __init__(
        self, destination: Destination, identity: _Identity, region: str
    ) -> None:
        self.destination = destination
        self.identity = identity
        self.queue_url = destination.sqs_queue_url
        self.stage = destination.stage
        self.region = region

    def from_exception(self, error: Exception) -> Failure:
        if isinstance(error, ClientError):
            details = error.response.get("Error", {})
            # JSON-protocol SQS errors carry the query-protocol code as well.
            codes = [details.get("Code", ""), details.get("QueryErrorCode", "")]
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return self.from_codes(codes, status, details.get("Message", ""))
        if isinstance(error, NoCredentialsError | PartialCredentialsError):
            return self.bad_credentials(type(error).__name__)
        if isinstance(error, ConnectTimeoutError | ReadTimeoutError):
            return self.transient(
                "timeout",
                f"Sending to queue {self.queue_url} timed out after "
                f"{settings.SQS_TIMEOUT:g} s ({type(error).__name__}).",
            )
        if isinstance(error, BotoConnectionError | HTTPClientError):
            return self.transient(
                "connection_failed",
                f"Could not connect to SQS in region {self.region} to send to queue "
                f"{self.queue_url} ({type(error).__name__}).",
            )
        return self.transient(
            "internal_error",
            f"Sending to queue {self.queue_url} failed in the AWS client "
            f"({type(error).__name__}).",
        )

    def from_code(self, code: str, status: int | None, aws_message: str) -> Failure:
        return self.from_codes([code], status, aws_message)

    def from_codes(
        self, error_codes: list[str], status: int | None, aws_message: str
    ) -> Failure:
        """Classify an error response by its codes, main code first, and HTTP
        status."""
        codes = {code for code in error_codes if code}
        code = next((code for code in error_codes if code), str(status or "no code"))
        detail = self._detail(aws_message)

        if codes & _NOT_FOUND_CODES:
            return self.permanent(
                "queue_not_found",
                f"Queue {self.queue_url} does not exist in region {self.region}, or "
                f"the platform's {self.stage} AWS account cannot see it ({code}). "
                "Check the queue URL and the region of this destination, or create "
                "the queue.",
            )
        if codes & _CREDENTIAL_CODES:
            return self.bad_credentials(code)
        if codes & _KMS_ACCESS_CODES:
            return self.permanent(
                "kms_access_denied",
                f"SQS could not use {self._kms_key()} to encrypt messages for queue "
                f"{self.queue_url} ({code}{detail}). Allow the platform's {self.stage} "
                "AWS principal kms:GenerateDataKey and kms:Decrypt in the key policy.",
            )
        if codes & _KMS_KEY_CODES:
            return self.permanent(
                "kms_access_denied",
                f"SQS could not use {self._kms_key()} for queue {self.queue_url} "
                f"({code}{detail}). Check that the key exists, is enabled and is a "
                "symmetric encryption key, and that its key policy allows the "
                f"platform's {self.stage} AWS principal kms:GenerateDataKey and "
                "kms:Decrypt.",
            )
        if codes & _KMS_THROTTLED_CODES:
            return self.transient(
                "kms_throttled",
                f"KMS throttled the encryption of a message for queue "
                f"{self.queue_url} ({code}). The send can be tried again later.",
            )
        if codes & _THROTTLED_CODES:
            return self.transient(
                "throttled",
                f"SQS throttled sending to queue {self.queue_url} ({code}). The send "
                "can be tried again later.",
            )
        if codes & _ACCESS_DENIED_CODES or status == 403:
            return self.permanent(
                "access_denied",
                f"SQS denied the platform's {self.stage} AWS principal access to queue "
                f"{self.queue_url} ({code}{detail}). Grant that principal "
                "sqs:SendMessage on the queue in the queue's access policy.",
            )
        if codes & _TOO_LARGE_CODES or (
            "InvalidParameterValue" in codes and _TOO_LONG_TEXT.search(aws_message)
        ):
            return self.permanent(
                "too_large",
                f"SQS rejected the message as too large for queue {self.queue_url} "
                f"({code}{detail}). Raise the queue's MaximumMessageSize, up to "
                f"{MAX_MAX_MESSAGE_SIZE:,} bytes.",
                blame=Blame.MESSAGE,
            )
        if codes & _INVALID_MESSAGE_CODES:
            return self.permanent(
                "invalid_message",
                f"SQS rejected the contents of the message for queue {self.queue_url} "
                f"({code}{detail}). This event cannot be sent to SQS.",
                blame=Blame.MESSAGE,
            )
        if codes & _SERVICE_ERROR_CODES or (status is not None and status >= 500):
            return self.transient(
                "service_error",
                f"SQS failed to accept a message for queue {self.queue_url} "
                f"({code}{detail}). The send can be tried again later.",
            )
        if status is not None and 400 <= status < 500:
            return self.permanent(
                "invalid_parameter",
                f"SQS rejected the request for queue {self.queue_url} "
                f"({code}{detail}). Check that the destination matches the queue: "
                "the queue URL, the region, and FIFO only for a queue whose name "
                "ends in .fifo.",
            )
        return self.transient(
            "service_error",
            f"Sending to queue {self.queue_url} failed ({code}{detail}). The send can "
            "be tried again later.",
        )

    def bad_credentials(self, code: str) -> Failure:
        # The AWS message is left out: for these codes it can echo the access key id.
        return self.permanent(
            "access_denied",
            f"AWS rejected the credentials the platform's {self.stage} stage sends "
            f"with ({code}) while sending to queue {self.queue_url}. The platform's "
            f"operators must fix the {self.stage} AWS credentials; the queue needs no "
            "change.",
        )

    def too_large(self, size: int, limit: _SizeLimit) -> Failure:
        message = (
            f"The message is {size:,} bytes (body and message attributes, in UTF-8) "
            f"but queue {self.queue_url} accepts at most {limit.size:,} bytes. Raise "
            f"the queue's MaximumMessageSize, up to {MAX_MAX_MESSAGE_SIZE:,} bytes."
        )
        if limit.assumed:
            message += (
                " The platform could not read the queue's MaximumMessageSize and "
                f"assumed {limit.size:,} bytes: grant the platform's {self.stage} AWS "
                "principal sqs:GetQueueAttributes on the queue so that it can."
            )
        return self.permanent("too_large", message, blame=Blame.MESSAGE)

    def invalid_body(self, reason: str) -> Failure:
        return self.permanent(
            "invalid_message",
            f"The message for queue {self.queue_url} cannot be sent because {reason}.",
            blame=Blame.MESSAGE,
        )

    def unknown_region(self) -> Failure:
        return self.permanent(
            "invalid_parameter",
            f"The region of queue {self.queue_url} is unknown: it is not in the queue "
            "URL. Set the region of this destination.",
        )

    def platform_settings(self, error: Exception) -> Failure:
        return self.transient(
            "platform_settings",
            f"The platform's {self.stage} AWS settings are invalid ({error}). The "
            "platform's operators must fix them; the queue needs no change.",
        )

    def missing_batch_result(self) -> Failure:
        return self.transient(
            "service_error",
            f"SQS returned no result for a message sent to queue {self.queue_url}. "
            "The send can be tried again later.",
        )

    def permanent(
        self, kind: str, message: str, blame: Blame = Blame.DESTINATION
    ) -> Failure:
        return Failure(kind=kind, message=message, permanent=True, blame=blame)

    def transient(self, kind: str, message: str) -> Failure:
        return Failure(kind=kind, message=message, permanent=False)

    def _detail(self, aws_message: str) -> str:
        text = self.identity.redact(" ".join(aws_message.split()))
        if len(text) > MAX_AWS_MESSAGE_LENGTH:
            text = text[: MAX_AWS_MESSAGE_LENGTH - 1] + "…"
        return f": {text}" if text else ""

    def _kms_key(self) -> str:
        if self.destination.sqs_kms_key_arn:
            return f"KMS key {self.destination.sqs_kms_key_arn}"
        return "the queue's KMS key"


# An error code inside an XML error body. moto responds to a JSON-protocol client
# with XML when it enforces IAM, and botocore then reports only the HTTP status as
# the code.
_XML_ERROR_CODE = re.compile(r"<Code>([^<]+)</Code>")


def _credential_error_code(error: Exception) -> str:
    """Return the error code showing that AWS rejected the platform's own
    credentials, not the queue's policy, or ""."""
    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return type(error).__name__
    if not isinstance(error, ClientError):
        return ""
    details = error.response.get("Error", {})
    codes = [details.get("Code", ""), details.get("QueryErrorCode", "")]
    codes += _XML_ERROR_CODE.findall(details.get("Message", ""))
    return next((code for code in codes if code in _CREDENTIAL_CODES), "")


def _attributes_denied(errors: "_Errors") -> str:
    return (
        f"SQS denied the platform's {errors.stage} AWS principal "
        f"sqs:GetQueueAttributes on queue {errors.queue_url}, so its settings could "
        "not be compared with this destination. Sending needs only sqs:SendMessage, "
        "which the queue's access policy may still grant: send a test event to "
        "check. Granting sqs:GetQueueAttributes as well lets this check and the "
        "message size check read the queue."
    )
