"""Publishing to GCP Pub/Sub topics with google-cloud-pubsub.

Each stage publishes as its own service account (settings.STAGE_IDENTITIES), so a
topic trusts TEST and PROD separately. With message ordering, each message carries
the changed object's id as its ordering key. Failures come back as `Failure` values
whose message names the topic, the service account and what to grant.
"""

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from django.conf import settings
from google.api_core import exceptions as api_exceptions
from google.api_core import retry as api_retry
from google.auth import load_credentials_from_file
from google.auth.exceptions import GoogleAuthError
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.publisher.exceptions import (
    MessageTooLargeError,
    PublishToPausedOrderingKeyException,
)
from google.pubsub_v1 import types as pubsub_types
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

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

logger = logging.getLogger(__name__)

# Pub/Sub's limits for one message and one publish request. google-cloud-pubsub 2.44
# checks the same request limit before it sends (_SERVER_PUBLISH_MAX_BYTES).
MAX_REQUEST_BYTES = 10_000_000
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1_024
MAX_ORDERING_KEY_BYTES = 1_024

PUBSUB_SCOPES = ["https://www.googleapis.com/auth/pubsub"]
PUBLISHER_ROLE = "roles/pubsub.publisher"
PUBLISH_PERMISSION = "pubsub.topics.publish"
MAX_SERVICE_MESSAGE_LENGTH = 500
# Extra seconds to wait for a publish result beyond the RPC's own timeout, because
# the client reports an RPC's outcome a little after the RPC's deadline.
RESULT_GRACE_SECONDS = 1.0

# The codes the client's default publish retry treats as transient.
_TRANSIENT_ERRORS = (
    api_exceptions.Aborted,
    api_exceptions.Cancelled,
    api_exceptions.DeadlineExceeded,
    api_exceptions.InternalServerError,
    api_exceptions.ResourceExhausted,
    api_exceptions.ServiceUnavailable,
    api_exceptions.Unknown,
)
# Words in an INVALID_ARGUMENT message that put the blame on the message, not on the
# topic. The topic name is removed from the text before this is matched.
_MESSAGE_PROBLEM = re.compile(
    r"attribute|message|ordering.?key|payload|too large|size|data|empty", re.I
)
# Options of the plaintext channel to an emulator host. The size caps are lifted as
# google-cloud-pubsub lifts them on its own channels.
_EMULATOR_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # A local server is reached directly, never through an http_proxy variable.
    ("grpc.enable_http_proxy", 0),
]


@dataclass(frozen=True)
class _Identity:
    """The Google identity and endpoint one stage publishes with."""

    stage: str
    credentials_file: str
    service_account: str
    emulator_host: str

    @classmethod
    def for_stage(cls, stage: str) -> "_Identity":
        values = settings.STAGE_IDENTITIES.get(stage, {})
        return cls(
            stage=stage,
            credentials_file=values.get("gcp_credentials_file", ""),
            service_account=values.get("gcp_service_account", ""),
            emulator_host=values.get("pubsub_emulator_host", ""),
        )

    def account(self) -> str:
        """Return the service account as messages name it."""
        if self.service_account:
            return f"service account {self.service_account}"
        email = _client_email(self.credentials_file)
        if email:
            return f"service account {email}"
        return f"the platform's {self.stage} service account"


def _client_email(credentials_file: str) -> str:
    """Return the client_email of a service account key file, or "" if unreadable."""
    if not credentials_file:
        return ""
    try:
        with open(credentials_file, encoding="utf-8") as key_file:
            email = json.load(key_file).get("client_email", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return email if isinstance(email, str) else ""


# One client per process and configuration. gRPC channels must not cross a fork, so
# the process id is part of the key and a forked worker builds its own clients.
_clients: dict[tuple[Any, ...], pubsub_v1.PublisherClient] = {}
_clients_lock = threading.Lock()


def publisher_for(destination: Destination) -> pubsub_v1.PublisherClient:
    """Return this process's PublisherClient for `destination`'s stage and settings.

    Raises GoogleAuthError when the stage's credentials cannot be loaded.
    """
    identity = _Identity.for_stage(destination.stage)
    ordering = destination.pubsub_ordering
    # Under an emulator host the regional endpoint is ignored, as the client itself
    # ignores it when PUBSUB_EMULATOR_HOST is set.
    endpoint = "" if identity.emulator_host else destination.pubsub_endpoint
    pid = os.getpid()
    key = (
        pid,
        identity.stage,
        identity.emulator_host,
        identity.credentials_file,
        endpoint,
        ordering,
    )
    with _clients_lock:
        client = _clients.get(key)
        if client is not None:
            return client
        # Clients inherited from a parent process share its channels: drop them
        # without closing them, since closing would touch the parent's channels.
        for stale in [k for k in _clients if k[0] != pid]:
            del _clients[stale]
        client = _new_client(identity, endpoint, ordering)
        _clients[key] = client
        return client


def _new_client(
    identity: _Identity, endpoint: str, ordering: bool
) -> pubsub_v1.PublisherClient:
    options = pubsub_v1.types.PublisherOptions(enable_message_ordering=ordering)
    # The engine hands the client all it has for a destination in one call, so
    # waiting the client's default 10 ms for more messages only adds latency.
    batching = pubsub_v1.types.BatchSettings(max_latency=settings.PUBSUB_BATCH_LATENCY)
    if identity.emulator_host:
        # What PUBSUB_EMULATOR_HOST does, for this client only: plaintext gRPC, no
        # credentials. Setting the variable would change every client in the process,
        # the other stage's included.
        channel = grpc.insecure_channel(
            identity.emulator_host, options=_EMULATOR_CHANNEL_OPTIONS
        )
        transport = PublisherGrpcTransport(host=identity.emulator_host, channel=channel)
        return pubsub_v1.PublisherClient(
            batching, publisher_options=options, transport=transport
        )

    kwargs: dict[str, Any] = {}
    if identity.credentials_file:
        credentials, _ = load_credentials_from_file(
            identity.credentials_file, scopes=PUBSUB_SCOPES
        )
        kwargs["credentials"] = credentials
    if endpoint:
        kwargs["client_options"] = {"api_endpoint": endpoint}
    # NOTE: with neither a key file nor an emulator host, the client finds
    # application default credentials itself, which may query the GCE metadata
    # server.
    return pubsub_v1.PublisherClient(batching, publisher_options=options, **kwargs)


def ordering_key(object_key: str) -> str:
    """Map an object key to an ordering key Pub/Sub accepts.

    A key longer than Pub/Sub's 1,024 bytes becomes "sha256-" and its hex digest, so
    one object's events still share one ordering key.
    """
    if len(object_key.encode()) <= MAX_ORDERING_KEY_BYTES:
        return object_key
    return "sha256-" + hashlib.sha256(object_key.encode()).hexdigest()


def publish_request_size(
    topic: str, data: bytes, attributes: Mapping[str, str], key: str
) -> int:
    """Return the bytes of a PublishRequest holding only this message, as the
    client library and Pub/Sub measure it against the 10 MB limit."""
    message = pubsub_types.PubsubMessage(
        data=data, attributes=dict(attributes), ordering_key=key
    )
    request = pubsub_types.PublishRequest(topic=topic, messages=[message])
    return int(pubsub_types.PublishRequest.pb(request).ByteSize())


def limit_problem(
    topic: str, data: bytes, attributes: Mapping[str, str], key: str = ""
) -> str | None:
    """Return which of Pub/Sub's message limits this message breaks, or None."""
    if len(attributes) > MAX_ATTRIBUTES:
        return (
            f"it has {len(attributes)} attributes and Pub/Sub accepts at most "
            f"{MAX_ATTRIBUTES}"
        )
    for name, value in attributes.items():
        name_size = len(name.encode())
        if name_size > MAX_ATTRIBUTE_KEY_BYTES:
            return (
                f"an attribute key is {name_size:,} bytes and Pub/Sub accepts at "
                f"most {MAX_ATTRIBUTE_KEY_BYTES:,}"
            )
        value_size = len(value.encode())
        if value_size > MAX_ATTRIBUTE_VALUE_BYTES:
            return (
                f"the value of attribute {name} is {value_size:,} bytes and Pub/Sub "
                f"accepts at most {MAX_ATTRIBUTE_VALUE_BYTES:,}"
            )
    key_size = len(key.encode())
    if key_size > MAX_ORDERING_KEY_BYTES:
        return (
            f"its ordering key is {key_size:,} bytes and Pub/Sub accepts at most "
            f"{MAX_ORDERING_KEY_BYTES:,}"
        )
    # Protobuf adds at most a tag byte and a 5-byte length to each field. Below
    # this bound the exact size, costly to compute, cannot break the limit.
    bound = len(topic.encode()) + len(data) + key_size + 64
    bound += sum(
        len(name.encode()) + len(value.encode()) + 32
        for name, value in attributes.items()
    )
    if bound <= MAX_REQUEST_BYTES:
        return None
    size = publish_request_size(topic, data, attributes, key)
    if size > MAX_REQUEST_BYTES:
        return (
            f"it is {size:,} bytes as a publish request (data, attributes and "
            f"ordering key) and Pub/Sub accepts at most {MAX_REQUEST_BYTES:,}"
        )
    return None


@dataclass
class _Pending:
    index: int
    future: Any
    key: str


@register
class PubSubTransport(Transport):
    kind = Kind.PUBSUB

    def send(self, messages: Sequence[OutgoingMessage]) -> list[Result]:
        """Publish every message, then wait for all of them, so that the client can
        batch them; return one result per message, in input order."""
        identity = _Identity.for_stage(self.destination.stage)
        errors = _Errors(self.destination, identity)
        try:
            client = publisher_for(self.destination)
        except (GoogleAuthError, OSError, ValueError) as error:
            logger.warning(
                "Cannot build a Pub/Sub client for destination %s: %s",
                self.destination.pk,
                type(error).__name__,
            )
            return [errors.platform_settings(error)] * len(messages)

        results: list[Result | None] = [None] * len(messages)
        pending = []
        resumed: set[str] = set()
        # Keys whose message the client rejected before sending, for a reason that
        # is not the message's own: their later messages are not handed over, so
        # none can arrive ahead of the failed one.
        stopped: dict[str, Failure] = {}
        keyed = [(self._ordering_key(message), message) for message in messages]
        # The client batches each ordering key on its own and sends a key's next
        # batch only when the one before is acknowledged. Handing it each key's
        # messages together, in order, lets them share one batch instead of going
        # out one request at a time behind each other.
        by_key = sorted(range(len(keyed)), key=lambda index: keyed[index][0])
        for index in by_key:
            key, message = keyed[index]
            if key in stopped:
                results[index] = stopped[key]
                continue
            if key and key not in resumed:
                # An earlier send's failure may have paused this key in this
                # process's client, and the engine only sends the key again once
                # that failure is recorded. Later messages of the key in this send
                # must stay paused if this one fails, so each key resumes once.
                _resume(client, errors.topic, key)
                resumed.add(key)
            outcome = self._publish(client, message, key, errors)
            if isinstance(outcome, Failure):
                results[index] = outcome
                if key and outcome.blame != Blame.MESSAGE:
                    stopped[key] = outcome
            else:
                pending.append(_Pending(index, outcome, key))

        wait_until = time.monotonic() + settings.PUBSUB_TIMEOUT + RESULT_GRACE_SECONDS
        for item in pending:
            results[item.index] = self._result(client, item, wait_until, errors)

        final = [errors.missing_result() if r is None else r for r in results]
        self._log_failures(messages, final)
        return final

    def _log_failures(
        self, messages: Sequence[OutgoingMessage], results: list[Result]
    ) -> None:
        """Log one line per send that had failures, not one per message."""
        failed = [
            (message.event_id, result.kind)
            for message, result in zip(messages, results, strict=True)
            if isinstance(result, Failure)
        ]
        if not failed:
            return
        logger.warning(
            "Publishing %d of %d events to destination %s failed (%s), first event %s",
            len(failed),
            len(messages),
            self.destination.pk,
            ", ".join(sorted({kind for _, kind in failed})),
            failed[0][0],
        )

    def _ordering_key(self, message: OutgoingMessage) -> str:
        if not self.destination.pubsub_ordering:
            return ""
        return ordering_key(message.object_key)

    def _publish(
        self,
        client: pubsub_v1.PublisherClient,
        message: OutgoingMessage,
        key: str,
        errors: "_Errors",
    ) -> Any:
        """Hand one message to the client; return its future or a Failure."""
        topic = errors.topic
        attributes = {"event_id": message.event_id, "event_type": message.event_type}
        problem = limit_problem(topic, message.body, attributes, key)
        if problem is not None:
            return errors.too_large(problem)

        try:
            return client.publish(
                topic,
                message.body,
                ordering_key=key,
                retry=self._retry(),
                timeout=settings.PUBSUB_TIMEOUT,
                **attributes,
            )
        except MessageTooLargeError as error:
            return errors.too_large(str(error))
        except (RuntimeError, ValueError) as error:
            return errors.client_error(error)

    def _retry(self) -> api_retry.Retry | None:
        """Return the retry for one publish: short, because the engine retries."""
        if self.destination.pubsub_ordering:
            # With message ordering the client stretches any retry to 2**32 s
            # (google-cloud-pubsub 2.44), so the client makes one attempt and the
            # engine owns every retry.
            return None
        return api_retry.Retry(
            predicate=api_retry.if_exception_type(*_TRANSIENT_ERRORS),
            initial=0.1,
            maximum=2.0,
            multiplier=2.0,
            timeout=settings.PUBSUB_TIMEOUT,
        )

    def _result(
        self,
        client: pubsub_v1.PublisherClient,
        item: _Pending,
        wait_until: float,
        errors: "_Errors",
    ) -> Result:
        remaining = max(0.0, wait_until - time.monotonic())
        try:
            message_id = item.future.result(timeout=remaining)
        except concurrent.futures.TimeoutError:
            failure = errors.timeout()
        except PublishToPausedOrderingKeyException:
            failure = errors.paused_key(item.key)
        except api_exceptions.GoogleAPICallError as error:
            failure = errors.from_api_error(error)
        except api_exceptions.RetryError as error:
            failure = errors.from_retry_error(error)
        except (GoogleAuthError, RuntimeError, ValueError) as error:
            failure = errors.client_error(error)
        else:
            return Sent(remote_message_id=str(message_id))

        if item.key:
            _resume(client, errors.topic, item.key)
        return failure

    def check(self) -> CheckResult:
        """Ask Pub/Sub whether the stage's service account may publish to the
        topic (TestIamPermissions), which publishes nothing."""
        identity = _Identity.for_stage(self.destination.stage)
        errors = _Errors(self.destination, identity)
        try:
            client = publisher_for(self.destination)
        except (GoogleAuthError, OSError, ValueError) as error:
            return CheckResult(ok=False, failure=errors.platform_settings(error))

        try:
            response = client.test_iam_permissions(
                request={"resource": errors.topic, "permissions": [PUBLISH_PERMISSION]},
                retry=None,
                timeout=settings.PUBSUB_TIMEOUT,
            )
        except api_exceptions.MethodNotImplemented:
            # Google's Pub/Sub emulator implements no IAM calls.
            return CheckResult(
                ok=False,
                findings=[
                    f"The Pub/Sub server for topic {errors.topic} does not implement "
                    "TestIamPermissions, so access could not be checked. Send a test "
                    "event to check it."
                ],
            )
        except api_exceptions.GoogleAPICallError as error:
            failure = errors.from_api_error(error)
            logger.info(
                "Checking destination %s: TestIamPermissions failed (%s)",
                self.destination.pk,
                failure.kind,
            )
            return CheckResult(ok=False, failure=failure)
        except (GoogleAuthError, RuntimeError, ValueError) as error:
            return CheckResult(ok=False, failure=errors.client_error(error))

        if PUBLISH_PERMISSION not in response.permissions:
            return CheckResult(ok=False, failure=errors.publish_not_granted())
        findings = [
            f"{_sentence_start(errors.account)} holds {PUBLISH_PERMISSION} on topic "
            f"{errors.topic}."
        ]
        if self.destination.pubsub_ordering:
            findings.append(
                "Events carry an ordering key, but a subscription delivers them in "
                "order only if it was created with message ordering enabled "
                "(gcloud pubsub subscriptions create ... --enable-message-ordering)."
            )
        return CheckResult(ok=True, findings=findings)


def _resume(client: pubsub_v1.PublisherClient, topic: str, key: str) -> None:
    """Let the client publish with `key` again after a failure paused it."""
    # The client raises RuntimeError when the key is not paused: it never failed, or
    # its publish is still running after our timeout. A new message then queues
    # behind that publish, in order.
    with contextlib.suppress(RuntimeError, ValueError):
        client.resume_publish(topic, key)


class _Errors:
    """Turns Pub/Sub errors into failures that name the topic and the account."""

    def __init__(self, destination: Destination, identity: _Identity) -> None:
        self.destination = destination
        self.identity = identity
        self.topic = destination.target
        self.stage = destination.stage
        self.account = identity.account()

    def from_api_error(self, error: api_exceptions.GoogleAPICallError) -> Failure:
        detail = self._detail(error)
        if isinstance(error, api_exceptions.NotFound):
            return self.permanent(
                "topic_not_found",
                f"Pub/Sub topic {self.topic} was not found{detail}. Create the topic "
                "or correct this destination's project ID and topic ID, then grant "
                f"{self.account} {self._grant()}.",
            )
        if isinstance(error, api_exceptions.PermissionDenied):
            return self.permanent(
                "access_denied",
                f"Pub/Sub denied {self.account} permission to publish to topic "
                f"{self.topic}{detail}. Grant {self.account} {self._grant()}.",
            )
        if isinstance(error, api_exceptions.Unauthenticated):
            return self.permanent(
                "unauthenticated",
                f"Pub/Sub could not authenticate {self.account} while publishing to "
                f"topic {self.topic}{detail}. The platform's operators must fix the "
                f"{self.stage} Google credentials; the topic only needs "
                f"{self.account} to hold {self._grant()}.",
            )
        if isinstance(error, api_exceptions.InvalidArgument):
            return self.invalid_argument(error, detail)
        if isinstance(error, api_exceptions.FailedPrecondition):
            return self.permanent(
                "failed_precondition",
                f"Pub/Sub rejected a publish to topic {self.topic} by {self.account} "
                f"because the topic is not in a state to accept it{detail}. Check "
                "the topic's settings, such as its Cloud KMS key and message storage "
                "policy.",
            )
        if isinstance(error, api_exceptions.DeadlineExceeded):
            return self.timeout(detail)
        if isinstance(error, api_exceptions.ServiceUnavailable):
            return self.transient(
                "unavailable",
                f"Pub/Sub was unavailable while publishing to topic {self.topic}"
                f"{detail}. The publish will be tried again.",
            )
        if isinstance(error, api_exceptions.ResourceExhausted):
            return self.transient(
                "resource_exhausted",
                f"Pub/Sub refused a publish to topic {self.topic} for lack of quota "
                f"or capacity{detail}. The publish will be tried again.",
            )
        return self.transient(
            "service_error",
            f"Publishing to topic {self.topic} failed with "
            f"{error.grpc_status_code.name if error.grpc_status_code else error.code}"
            f"{detail}. The publish will be tried again.",
        )

    def invalid_argument(
        self, error: api_exceptions.GoogleAPICallError, detail: str
    ) -> Failure:
        text = str(error.message or "").replace(self.topic, "")
        if _MESSAGE_PROBLEM.search(text):
            return self.permanent(
                "invalid_argument",
                f"Pub/Sub rejected this message for topic {self.topic}{detail}. This "
                "event cannot be published to Pub/Sub.",
                blame=Blame.MESSAGE,
            )
        return self.permanent(
            "invalid_argument",
            f"Pub/Sub rejected a publish to topic {self.topic} by {self.account}"
            f"{detail}. Check this destination's project ID and topic ID, and that "
            f"{self.account} holds {self._grant()}.",
        )

    def publish_not_granted(self) -> Failure:
        # NOTE: for a topic that does not exist, Pub/Sub may return no permissions
        # instead of NOT_FOUND, so the message names both causes.
        return self.permanent(
            "access_denied",
            f"{_sentence_start(self.account)} does not hold {PUBLISH_PERMISSION} on "
            f"topic {self.topic}, or the topic does not exist. Grant {self.account} "
            f"{self._grant()}.",
        )

    def from_retry_error(self, error: api_exceptions.RetryError) -> Failure:
        cause = error.cause
        if isinstance(cause, api_exceptions.GoogleAPICallError):
            return self.from_api_error(cause)
        return self.timeout()

    def timeout(self, detail: str = "") -> Failure:
        return self.transient(
            "timeout",
            f"Publishing to topic {self.topic} timed out after "
            f"{settings.PUBSUB_TIMEOUT:g} s{detail}. The publish will be tried again.",
        )

    def paused_key(self, key: str) -> Failure:
        return self.transient(
            "ordering_key_paused",
            f"This message was not published to topic {self.topic} because an "
            f"earlier message with ordering key {key!r} failed in the same batch. "
            "It will be tried again after that message.",
        )

    def too_large(self, problem: str) -> Failure:
        return self.permanent(
            "too_large",
            f"The message for topic {self.topic} cannot be published: {problem}. "
            "This event cannot be published to Pub/Sub.",
            blame=Blame.MESSAGE,
        )

    def client_error(self, error: Exception) -> Failure:
        return self.transient(
            "internal_error",
            f"Publishing to topic {self.topic} failed in the Pub/Sub client "
            f"({type(error).__name__}: {_shorten(str(error))}).",
        )

    def platform_settings(self, error: Exception) -> Failure:
        return self.transient(
            "platform_settings",
            f"The platform's {self.stage} Google credentials could not be loaded "
            f"({type(error).__name__}: {_shorten(str(error))}). The platform's "
            f"operators must fix them; topic {self.topic} needs no change.",
        )

    def missing_result(self) -> Failure:
        return self.transient(
            "internal_error",
            f"The Pub/Sub client returned no result for a message to topic "
            f"{self.topic}. The publish will be tried again.",
        )

    def permanent(
        self, kind: str, message: str, blame: Blame = Blame.DESTINATION
    ) -> Failure:
        return Failure(kind=kind, message=message, permanent=True, blame=blame)

    def transient(self, kind: str, message: str) -> Failure:
        return Failure(kind=kind, message=message, permanent=False)

    def _grant(self) -> str:
        return (
            f"the role {PUBLISHER_ROLE} (permission {PUBLISH_PERMISSION}) on the topic"
        )

    def _detail(self, error: api_exceptions.GoogleAPICallError) -> str:
        text = _shorten(" ".join(str(error.message or "").split()))
        return f" ({text})" if text else ""


def _sentence_start(text: str) -> str:
    """Return `text` with its first letter in uppercase and the rest unchanged."""
    return text[:1].upper() + text[1:]


def _shorten(text: str) -> str:
    if len(text) > MAX_SERVICE_MESSAGE_LENGTH:
        return text[: MAX_SERVICE_MESSAGE_LENGTH - 1] + "…"
    return text
