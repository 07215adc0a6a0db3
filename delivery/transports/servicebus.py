"""Sending to Azure Service Bus queues and topics with azure-servicebus.

Each destination carries its own connection string, stored encrypted. It is decrypted
only to open this process's client and sender for the destination, which are then
reused: opening one costs a connection, a token exchange and a link. Failures come
back as `Failure` values that name the entity, the namespace and the shared access
key name, and never contain the key, a signature or the connection string.
"""

import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusSender,
)
from azure.servicebus.exceptions import (
    MessageSizeExceededError,
    MessagingEntityDisabledError,
    MessagingEntityNotFoundError,
    OperationTimeoutError,
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
    ServiceBusCommunicationError,
    ServiceBusConnectionError,
    ServiceBusError,
    ServiceBusQuotaExceededError,
    ServiceBusServerBusyError,
)
from cryptography.fernet import InvalidToken
from django.conf import settings
from django.core.exceptions import ValidationError

from destinations.encryption import EncryptionKeyError
from destinations.models import Destination, EntityType, Kind
from destinations.validation.servicebus import (
    ConnectionString,
    parse_connection_string,
)

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

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"
# Service Bus limits, from the "Service Bus quotas" page of the Azure docs: a message
# id and a session id have at most 128 characters, each message property at most
# 32 KB, and all properties together (the header) at most 64 KB. A partition key has
# at most 128 characters too (ServiceBusMessage.PartitionKey in the .NET reference).
MAX_ID_LENGTH = 128
MAX_PROPERTY_SIZE = 32_768
MAX_HEADER_SIZE = 65_536
# Bytes of a batch's limit kept for the batch's own header, which the SDK's count
# leaves out (azure-servicebus 7.15 copies the first message's ids into it). A full
# batch of small messages overshot the limit by 28 bytes without it.
BATCH_HEADER_ROOM = 1_024
HASHED_ID_PREFIX = "sha256-"
# The retries the SDK makes itself. With its defaults it retries a rejected key for
# about 15 s, so the delivery engine owns retries instead. `send` only reconnects
# once when the connection or link of a sender that worked before was lost.
SDK_RETRY_TOTAL = 0
MAX_DETAIL_LENGTH = 300

SESSION_REQUIRED_TEXT = "sessionid"
NOT_ALLOWED = "amqp:not-allowed"


def service_bus_id(value: str) -> str:
    """Map `value` to a session id, partition key or message id Service Bus accepts.

    Service Bus takes at most 128 characters, counted as .NET counts them (UTF-16
    code units). An empty value, a longer one, or one with a control character
    becomes "sha256-" and its 64 hex digits instead, so that the same object key
    always maps to the same session and partition.
    """
    length = len(value.encode("utf-16-le")) // 2
    if 0 < length <= MAX_ID_LENGTH and value.isprintable():
        return value
    return HASHED_ID_PREFIX + hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True)
class _Prepared:
    """One message ready to send, with the ids it will carry."""

    index: int
    message_id: str
    # The session id and/or partition key, when the destination uses them.
    key: str | None
    body: bytes
    application_properties: dict[str, str]
    size: int

    def build(self, sessions: bool, partitioning: bool) -> ServiceBusMessage:
        # A new object for every attempt: the SDK annotates the ones it sends.
        properties: dict[str | bytes, Any] = {
            name: value for name, value in self.application_properties.items()
        }
        return ServiceBusMessage(
            self.body,
            message_id=self.message_id,
            content_type=CONTENT_TYPE,
            application_properties=properties,
            session_id=self.key if sessions else None,
            # Equal to the session id when both are on, as Service Bus requires.
            partition_key=self.key if partitioning else None,
        )


@dataclass
class _CachedSender:
    client: ServiceBusClient
    sender: ServiceBusSender
    # A ServiceBusSender is not thread-safe.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Whether a send through it succeeded: only then can a lost connection mean a
    # stale link rather than an unreachable namespace.
    has_sent: bool = False
    # Maximum bytes of one batch: the link's announced maximum less BATCH_HEADER_ROOM.
    batch_limit: int | None = None


# Keyed by (destination id, digest of the connection string and entity, process id).
_senders: dict[tuple[int, str, int], _CachedSender] = {}
_senders_lock = threading.Lock()


def _sender_key(
    destination: Destination, connection_string: str
) -> tuple[int, str, int]:
    # A digest, so a rotated key gets a new sender without the secret itself being
    # kept in one more place. The process id keeps a forked worker from using the
    # connection of its parent.
    text = "\n".join(
        (
            connection_string,
            destination.servicebus_entity_type,
            _entity_name(destination),
        )
    )
    digest = hashlib.sha256(text.encode()).hexdigest()
    return (destination.pk or 0, digest, os.getpid())


def _cached_sender(destination: Destination, connection_string: str) -> _CachedSender:
    """Return this process's sender for `destination`, opening a client once."""
    key = _sender_key(destination, connection_string)
    stale: list[_CachedSender] = []
    with _senders_lock:
        cached = _senders.get(key)
        if cached is not None:
            return cached

        for other in list(_senders):
            if other[0] == key[0] and other[2] == key[2]:
                # The destination's connection string or entity changed.
                stale.append(_senders.pop(other))
            elif other[2] != key[2]:
                # Inherited from the parent process across a fork: forget it without
                # closing, because closing would use the parent's socket.
                del _senders[other]

        client = ServiceBusClient.from_connection_string(
            connection_string,
            retry_total=SDK_RETRY_TOTAL,
            # Bounds opening the link, which `create_message_batch` does outside the
            # send's own timeout.
            try_timeout=settings.SERVICEBUS_TIMEOUT,
        )
        entity = _entity_name(destination)
        if destination.servicebus_entity_type == EntityType.TOPIC:
            sender = client.get_topic_sender(topic_name=entity)
        else:
            sender = client.get_queue_sender(queue_name=entity)
        cached = _CachedSender(client=client, sender=sender)
        _senders[key] = cached

    for old in stale:
        _close(old)
    logger.info(
        "Created a Service Bus sender for destination %s (%s %s)",
        destination.pk,
        destination.servicebus_entity_type,
        _entity_name(destination),
    )
    return cached


def _drop(cached: _CachedSender) -> None:
    """Forget and close `cached`, so that the next send opens a new connection."""
    with _senders_lock:
        for key, value in list(_senders.items()):
            if value is cached:
                del _senders[key]
    _close(cached)


def _close(cached: _CachedSender) -> None:
    for handler in (cached.sender, cached.client):
        try:
            handler.close()
        except Exception:
            # Closing a connection that already failed may fail again; the sender is
            # discarded either way.
            logger.debug("Closing a Service Bus handler failed", exc_info=True)


def close_senders() -> None:
    """Close every Service Bus sender this process opened."""
    with _senders_lock:
        mine = [key for key in _senders if key[2] == os.getpid()]
        cached = [_senders.pop(key) for key in mine]
    for sender in cached:
        _close(sender)


def _entity_name(destination: Destination) -> str:
    return destination.servicebus_entity_name or destination.servicebus_entity_path


@register
class ServiceBusTransport(Transport):
    kind = Kind.SERVICEBUS

    def send(self, messages: Sequence[OutgoingMessage]) -> list[Result]:
        if not messages:
            return []
        try:
            connection_string = self.destination.connection_string()
        except (InvalidToken, EncryptionKeyError) as error:
            logger.error(
                "Cannot decrypt the connection string of destination %s: %s",
                self.destination.pk,
                type(error).__name__,
            )
            failure = _Errors.undecryptable(self.destination, error)
            return [failure] * len(messages)

        errors = _Errors(self.destination, connection_string)
        try:
            parsed = parse_connection_string(connection_string)
        except ValidationError as error:
            logger.warning(
                "The connection string of Service Bus destination %s is invalid",
                self.destination.pk,
            )
            return [errors.invalid_connection_string(error)] * len(messages)
        errors.parsed = parsed

        results: list[Result | None] = [None] * len(messages)
        prepared: list[_Prepared] = []
        for index, message in enumerate(messages):
            item = self._prepare(index, message)
            problem = self._size_problem(item)
            if problem:
                results[index] = errors.too_large(problem)
            else:
                prepared.append(item)

        stopped: Failure | None = None
        for run in self._runs(prepared):
            if stopped is not None:
                run_results: list[Result] = [stopped] * len(run)
            else:
                run_results = self._send_run(connection_string, run, errors)
            for item, result in zip(run, run_results, strict=True):
                results[item.index] = result
                # After a failure that is not the message's own, sending later
                # messages could overtake it: they get the same failure.
                if isinstance(result, Failure) and result.blame != Blame.MESSAGE:
                    stopped = stopped or result

        return [result or errors.not_sent() for result in results]

    def _prepare(self, index: int, message: OutgoingMessage) -> _Prepared:
        destination = self.destination
        uses_key = (
            destination.servicebus_sessions or destination.servicebus_partitioning
        )
        key = service_bus_id(message.object_key) if uses_key else None
        properties = {"event_type": message.event_type, "event_id": message.event_id}
        message_id = service_bus_id(message.event_id)
        system_values = [message_id, CONTENT_TYPE]
        if destination.servicebus_sessions and key is not None:
            system_values.append(key)
        if destination.servicebus_partitioning and key is not None:
            system_values.append(key)
        size = len(message.body) + sum(len(value.encode()) for value in system_values)
        size += sum(
            len(name.encode()) + len(value.encode())
            for name, value in properties.items()
        )
        return _Prepared(
            index=index,
            message_id=message_id,
            key=key,
            body=message.body,
            application_properties=properties,
            size=size,
        )

    def _size_problem(self, item: _Prepared) -> str:
        """Return why Service Bus would reject `item` for its size, or ""."""
        limit = self.destination.servicebus_max_message_size
        header = item.size - len(item.body)
        for name, value in item.application_properties.items():
            property_size = len(name.encode()) + len(value.encode())
            if property_size > MAX_PROPERTY_SIZE:
                return (
                    f"its application property {name!r} is {property_size:,} bytes, "
                    f"but Service Bus accepts at most {MAX_PROPERTY_SIZE:,} bytes per "
                    "property"
                )
        if header > MAX_HEADER_SIZE:
            return (
                f"its properties are {header:,} bytes together, but Service Bus "
                f"accepts at most {MAX_HEADER_SIZE:,} bytes of properties"
            )
        if item.size > limit:
            # NOTE: Service Bus adds system properties of its own (sequence number,
            # enqueued time), so a message a few dozen bytes under the limit may
            # still be rejected. Such a rejection is reported as too_large as well.
            return (
                f"it is {item.size:,} bytes (body and properties, in UTF-8), but "
                f"this destination's maximum message size is {limit:,} bytes"
            )
        return ""

    def _runs(self, prepared: list[_Prepared]) -> Iterator[list[_Prepared]]:
        """Split `prepared`, kept in order, into runs that may share a batch.

        A partitioned entity rejects a batch whose messages differ in partition key
        or session id, so with partitioning a run holds one key. Without it, one
        batch may mix sessions: Service Bus accepts or rejects a batch as a whole,
        so no message of a session can get ahead of an earlier one that failed.
        """
        by_key = self.destination.servicebus_partitioning
        run: list[_Prepared] = []
        for item in prepared:
            if run and by_key and item.key != run[0].key:
                yield run
                run = []
            run.append(item)
        if run:
            yield run

    def _send_run(
        self, connection_string: str, run: list[_Prepared], errors: "_Errors"
    ) -> list[Result]:
        """Send `run` in as few batches as fit, in order; one result per message."""
        results: list[Result] = []
        remaining = list(run)
        reconnected = False
        while remaining:
            try:
                cached = _cached_sender(self.destination, connection_string)
            except ValueError as error:
                # The client rejects an entity name that differs from EntityPath.
                failure = errors.from_exception(error)
                logger.warning(
                    "Cannot create a Service Bus sender for destination %s: %s",
                    self.destination.pk,
                    failure.kind,
                )
                return results + [failure] * len(remaining)

            with cached.lock:
                outcome = self._send_batch(cached, remaining)
            if not isinstance(outcome, BaseException):
                cached.has_sent = True
                results.extend(
                    Sent(remote_message_id=item.message_id) for item in outcome
                )
                remaining = remaining[len(outcome) :]
                continue

            failure = errors.from_exception(outcome)
            if failure.blame != Blame.MESSAGE:
                _drop(cached)
            if (
                errors.is_lost_connection(outcome)
                and cached.has_sent
                and not reconnected
            ):
                # A sender idle for 10 minutes has its link detached by Service Bus,
                # which only shows on the next send.
                logger.info(
                    "Reconnecting the Service Bus sender of destination %s after %s",
                    self.destination.pk,
                    type(outcome).__name__,
                )
                reconnected = True
                continue

            logger.warning(
                "Sending to Service Bus destination %s failed: %s (%s)",
                self.destination.pk,
                failure.kind,
                type(outcome).__name__,
            )
            if failure.blame == Blame.MESSAGE and len(remaining) > 1:
                # The batch was refused for one message in it: send each alone.
                return results + self._send_each(connection_string, remaining, errors)
            return results + [failure] * len(remaining)
        return results

    def _send_each(
        self, connection_string: str, items: list[_Prepared], errors: "_Errors"
    ) -> list[Result]:
        results: list[Result] = []
        for item in items:
            result = self._send_run(connection_string, [item], errors)[0]
            results.append(result)
            if isinstance(result, Failure) and result.blame != Blame.MESSAGE:
                # Later messages could overtake this one: they get its failure.
                results.extend([result] * (len(items) - len(results)))
                break
        return results

    def _send_batch(
        self, cached: _CachedSender, remaining: list[_Prepared]
    ) -> list[_Prepared] | Exception:
        """Send the longest prefix of `remaining` that fits one batch; return it, or
        the exception that stopped it."""
        sessions = self.destination.servicebus_sessions
        partitioning = self.destination.servicebus_partitioning
        timeout = settings.SERVICEBUS_TIMEOUT
        try:
            if len(remaining) == 1:
                message = remaining[0].build(sessions, partitioning)
                cached.sender.send_messages(message, timeout=timeout)
                return remaining[:1]

            # The batch's limit is the one Service Bus announces on the link, less
            # room for the batch's own header: the SDK leaves it out of its count.
            if cached.batch_limit is None:
                announced = cached.sender.create_message_batch().max_size_in_bytes
                cached.batch_limit = max(1, announced - BATCH_HEADER_ROOM)
            batch = cached.sender.create_message_batch(
                max_size_in_bytes=cached.batch_limit
            )
            added: list[_Prepared] = []
            for item in remaining:
                try:
                    batch.add_message(item.build(sessions, partitioning))
                except MessageSizeExceededError:
                    break
                added.append(item)
            if not added:
                # Too large even alone in a batch: send it as a plain message and let
                # Service Bus judge it.
                message = remaining[0].build(sessions, partitioning)
                cached.sender.send_messages(message, timeout=timeout)
                return remaining[:1]
            cached.sender.send_messages(batch, timeout=timeout)
            return added
        except (ServiceBusError, ValueError, TimeoutError) as error:
            return error

    def check(self) -> CheckResult:
        """Open a sender link to the entity (put-token, then attach) and close it
        without sending: a wrong key, a policy without Send or a missing entity fails
        here as a send would."""
        try:
            connection_string = self.destination.connection_string()
        except (InvalidToken, EncryptionKeyError) as error:
            failure = _Errors.undecryptable(self.destination, error)
            return CheckResult(ok=False, failure=failure)
        errors = _Errors(self.destination, connection_string)
        try:
            errors.parsed = parse_connection_string(connection_string)
        except ValidationError as error:
            failure = errors.invalid_connection_string(error)
            return CheckResult(ok=False, failure=failure)

        try:
            announced = _open_sender_link(self.destination, connection_string)
        except (ServiceBusError, ValueError, TimeoutError) as error:
            failure = errors.from_exception(error)
            logger.info(
                "Checking Service Bus destination %s: opening a sender link failed: "
                "%s (%s)",
                self.destination.pk,
                failure.kind,
                type(error).__name__,
            )
            return CheckResult(ok=False, failure=failure)

        findings = [
            f"The connection string can send to {errors.target}: Service Bus "
            f"accepted the shared access key named {errors.key_name!r} and attached "
            "a sender link."
        ]
        mismatches = []
        limit = self.destination.servicebus_max_message_size
        if announced is not None:
            findings.append(
                f"Service Bus announced a maximum message size of {announced:,} bytes "
                "on the link."
            )
            if announced != limit:
                effect = (
                    "so that larger events fail before they are sent"
                    if limit > announced
                    else "so that events up to that size are sent"
                )
                mismatches.append(
                    f"Maximum message size is {limit:,} bytes here, but the "
                    f"{errors.target} accepts {announced:,} bytes. Set it to "
                    f"{announced:,} bytes, {effect}."
                )
        # NOTE: Service Bus shows whether an entity requires sessions or is
        # partitioned only through its management API, which needs the Manage
        # right that a Send-only policy lacks, and the sender link does not carry
        # it. So these two settings are not compared.
        sessions = "on" if self.destination.servicebus_sessions else "off"
        findings.append(
            "Whether the entity requires sessions cannot be read with a Send-only "
            f"key. Sessions required is {sessions} here: if the entity differs, a "
            "test event fails with session_required or not_allowed."
        )
        return CheckResult(ok=not mismatches, findings=findings, mismatches=mismatches)


def _open_sender_link(destination: Destination, connection_string: str) -> int | None:
    """Open a sender link to `destination`'s entity on a new connection, close both,
    and return the maximum message size Service Bus announced on the link."""
    client = ServiceBusClient.from_connection_string(
        connection_string,
        retry_total=SDK_RETRY_TOTAL,
        try_timeout=settings.SERVICEBUS_TIMEOUT,
    )
    with client:
        entity = _entity_name(destination)
        if destination.servicebus_entity_type == EntityType.TOPIC:
            sender = client.get_topic_sender(topic_name=entity)
        else:
            sender = client.get_queue_sender(queue_name=entity)
        # Entering the sender opens its link: azure-servicebus 7.15 exchanges the
        # token and attaches there.
        with sender:
            # NOTE: a private attribute of azure-servicebus 7.15. It contains the
            # SDK's 1 MiB default instead when the attach carries no maximum size.
            announced = getattr(sender, "_max_message_size_on_link", None)
    if isinstance(announced, int) and announced > 0:
        return announced
    return None


class _Errors:
    """Turns Service Bus errors into failures that name the entity and the key name,
    with every secret of the connection string removed."""

    def __init__(self, destination: Destination, connection_string: str) -> None:
        self.destination = destination
        self.connection_string = connection_string
        self.parsed: ConnectionString | None = None
        self.entity_type = destination.servicebus_entity_type
        self.entity = _entity_name(destination)

    @property
    def key_name(self) -> str:
        if self.parsed is not None and self.parsed.key_name:
            return self.parsed.key_name
        return self.destination.servicebus_key_name or "(unknown)"

    @property
    def namespace(self) -> str:
        if self.parsed is not None:
            return self.parsed.address
        return self.destination.servicebus_namespace or "(unknown)"

    @property
    def target(self) -> str:
        return f"{self.entity_type} {self.entity!r} in namespace {self.namespace}"

    def from_exception(self, error: BaseException) -> Failure:
        detail = self._detail(error)
        if isinstance(error, MessageSizeExceededError):
            return self.permanent(
                "too_large",
                f"Service Bus rejected the message as too large for {self.target}"
                f"{detail}. The entity's maximum message size depends on the "
                "namespace's tier: 256 KB on Standard, up to 100 MB on Premium. Set "
                "this destination's maximum message size to the entity's, so that "
                "such events fail before they are sent.",
                blame=Blame.MESSAGE,
            )

        if isinstance(error, ServiceBusAuthenticationError):
            return self._authentication(error, detail)

        if isinstance(error, ServiceBusAuthorizationError):
            return self.permanent(
                "access_denied",
                f"Service Bus denied the shared access policy {self.key_name!r} "
                f"sending to {self.target}{detail}. The policy needs the Send claim "
                f"on the {self.entity_type} or the namespace: use the connection "
                "string of a policy with Send.",
            )

        if isinstance(error, MessagingEntityNotFoundError):
            return self.permanent(
                "entity_not_found",
                f"The {self.target} does not exist{detail}. Check the entity name and "
                f"that it is a {self.entity_type}, or create it.",
            )

        if isinstance(error, MessagingEntityDisabledError):
            return self.permanent(
                "entity_disabled",
                f"The {self.target} is disabled or send-disabled{detail}. Set its "
                "status to Active.",
            )

        if isinstance(error, ServiceBusServerBusyError):
            return self.transient(
                "server_busy",
                f"Service Bus is busy and did not accept the message for "
                f"{self.target}{detail}. The send can be tried again later.",
            )

        if isinstance(error, OperationTimeoutError | TimeoutError):
            return self.transient(
                "timeout",
                f"Sending to {self.target} timed out after "
                f"{settings.SERVICEBUS_TIMEOUT:g} s{detail}. The send can be tried "
                "again later.",
            )

        if isinstance(error, ServiceBusQuotaExceededError):
            return self.transient(
                "quota_exceeded",
                f"Service Bus reports a quota exceeded for {self.target}{detail}: the "
                "entity may be full or the namespace may have too many connections. "
                "Receive messages from the entity to free space; the send will be "
                "tried again later.",
            )

        if isinstance(error, ServiceBusConnectionError | ServiceBusCommunicationError):
            return self.transient(
                "connection_failed",
                f"The connection to namespace {self.namespace} failed while sending "
                f"to its {self.entity_type} {self.entity!r}{detail}. The send can be "
                "tried again later.",
            )

        if isinstance(error, ServiceBusError) and _condition(error) == NOT_ALLOWED:
            return self._not_allowed(detail)

        if isinstance(error, ValueError):
            return self.permanent(
                "invalid_configuration",
                f"The Service Bus client refused the settings of this destination "
                f"for {self.target}{detail}. Check the entity name against the "
                "EntityPath of the connection string.",
            )

        return self.transient(
            "service_error",
            f"Sending to {self.target} failed{detail}. The send can be tried again "
            "later.",
        )

    def _authentication(self, error: BaseException, detail: str) -> Failure:
        inner = getattr(error, "inner_exception", None)
        status = getattr(inner, "status_code", None)
        description = getattr(inner, "status_description", None)
        if isinstance(description, bytes):
            description = description.decode(errors="replace")
        if isinstance(status, int):
            # The put-token reply's status is more specific than the condition.
            detail = self._shorten(
                f"status {status}: {description or 'no description'}"
            )
        if isinstance(status, int) and status >= 500:
            return self.transient(
                "service_error",
                f"Service Bus could not check the shared access key for "
                f"{self.target}{detail}. The send can be tried again later.",
            )
        return self.permanent(
            "unauthorized",
            f"Service Bus rejected the shared access key named {self.key_name!r} for "
            f"{self.target}{detail}: the key, its name or the shared access "
            "signature is wrong or expired. Copy the connection string of a shared "
            "access policy with the Send claim again.",
        )

    def _not_allowed(self, detail: str) -> Failure:
        if SESSION_REQUIRED_TEXT in detail.lower().replace(" ", ""):
            return self.permanent(
                "session_required",
                f"The {self.target} requires sessions, so every message needs a "
                f"session id{detail}. Turn on 'sessions required' for this "
                "destination.",
            )
        return self.permanent(
            "not_allowed",
            f"Service Bus did not allow the send to {self.target}{detail}. Check "
            "that the sessions and partitioning settings of this destination match "
            "the entity.",
        )

    @staticmethod
    def is_lost_connection(error: BaseException) -> bool:
        return isinstance(
            error, ServiceBusConnectionError | ServiceBusCommunicationError
        )

    def too_large(self, problem: str) -> Failure:
        return self.permanent(
            "too_large",
            f"The message for {self.target} cannot be sent because {problem}. Raise "
            "this destination's maximum message size only if the entity's own "
            "maximum allows it (Premium tier, up to 100 MB).",
            blame=Blame.MESSAGE,
        )

    def invalid_connection_string(self, error: ValidationError) -> Failure:
        # The parser's messages never contain a secret.
        problems = " ".join(error.messages)
        return self.permanent(
            "invalid_connection_string",
            f"The connection string of this destination for {self.entity_type} "
            f"{self.entity!r} is invalid: {problems}",
        )

    @staticmethod
    def undecryptable(destination: Destination, error: Exception) -> Failure:
        return Failure(
            kind="platform_settings",
            message=(
                f"The platform cannot decrypt the connection string of destination "
                f"{destination.pk} ({type(error).__name__}). The platform's operators "
                "must check ENCRYPTION_KEYS; the destination needs no change."
            ),
            permanent=False,
        )

    def not_sent(self) -> Failure:
        return self.transient(
            "service_error",
            f"The message for {self.target} was not sent. The send can be tried "
            "again later.",
        )

    def permanent(
        self, kind: str, message: str, blame: Blame = Blame.DESTINATION
    ) -> Failure:
        return Failure(kind=kind, message=message, permanent=True, blame=blame)

    def transient(self, kind: str, message: str) -> Failure:
        return Failure(kind=kind, message=message, permanent=False)

    def _detail(self, error: BaseException) -> str:
        """Return the service's condition and description as " (...)", or ""."""
        inner = getattr(error, "inner_exception", None)
        condition = _condition(error)
        description = getattr(inner, "description", None)
        if isinstance(description, bytes):
            description = description.decode(errors="replace")
        if not description and not isinstance(error, ServiceBusError):
            description = str(error)
        parts = [part for part in (condition, description) if part]
        if not parts:
            return ""
        return self._shorten(": ".join(parts))

    def _shorten(self, text: str) -> str:
        """Return `text` without secrets, on one line, cut short, as " (...)"."""
        text = self.redact(" ".join(text.split()))
        if len(text) > MAX_DETAIL_LENGTH:
            text = text[: MAX_DETAIL_LENGTH - 1] + "…"
        return f" ({text})"

    def redact(self, text: str) -> str:
        secrets: list[str | None] = [self.connection_string]
        if self.parsed is not None:
            secrets += [self.parsed.key, self.parsed.shared_access_signature]
        for secret in secrets:
            if secret:
                text = text.replace(secret, "[redacted]")
        return text


def _condition(error: BaseException) -> str | None:
    """Return the AMQP error condition behind an SDK error, such as amqp:not-found."""
    inner = getattr(error, "inner_exception", None)
    condition = getattr(inner, "condition", None)
    if condition is None:
        return None
    if isinstance(condition, bytes):
        return condition.decode(errors="replace")
    return str(condition)
