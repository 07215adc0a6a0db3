"""A Pub/Sub peer: a gRPC server on a loopback address that speaks google.pubsub.v1.

It implements the Publisher and Subscriber calls that google-cloud-pubsub makes to
publish, and those that tests need to read messages back: CreateTopic, GetTopic,
DeleteTopic, Publish, CreateSubscription, GetSubscription, DeleteSubscription, Pull,
Acknowledge and ModifyAckDeadline, and google.iam.v1.IAMPolicy's TestIamPermissions
on topics. Clients reach it as they reach Google's emulator, through
PUBSUB_EMULATOR_HOST=host:port, or through an explicit insecure channel.

Unlike Google's emulator it enforces the service's size limits, and a test can make
it fail the next publishes with a chosen gRPC status code, or deny permissions on a
topic. It keeps everything in memory.

Run it alone with `python -m delivery.peers.pubsub --port 8085`.
"""

import argparse
import contextlib
import itertools
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import grpc
from google.api_core import exceptions as api_exceptions
from google.cloud import pubsub_v1
from google.iam.v1 import iam_policy_pb2
from google.pubsub_v1 import types
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

logger = logging.getLogger(__name__)

# Pub/Sub's limits for one message and one publish request. google-cloud-pubsub 2.44
# checks the same request limit before it sends (_SERVER_PUBLISH_MAX_BYTES).
MAX_REQUEST_BYTES = 10_000_000
MAX_MESSAGE_BYTES = 10_000_000
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1_024
MAX_ORDERING_KEY_BYTES = 1_024

# Subscription.ack_deadline_seconds: 0 means the default, else 10 to 600 seconds.
DEFAULT_ACK_DEADLINE_SECONDS = 10
MAX_ACK_DEADLINE_SECONDS = 600
# How long a Pull waits for a message before it returns an empty response.
PULL_WAIT_SECONDS = 1.0
# gRPC's default 4 MiB receive limit would reject a valid 10 MB publish before the
# peer could check it and return INVALID_ARGUMENT as Pub/Sub does.
MAX_GRPC_MESSAGE_BYTES = 32 * 1024 * 1024
# Options of the clients' channels to a peer or emulator. The size caps are lifted as
# google-cloud-pubsub lifts them on its own channels.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # A local server is reached directly, never through an http_proxy variable.
    ("grpc.enable_http_proxy", 0),
]

# The peer's own service for tests and scripts that run it in another process.
ADMIN_SERVICE = "portal.pubsubpeer.v1.Admin"

# Topic and subscription IDs: 3 to 255 characters, starting with a letter, and not
# starting with "goog" (Topic.name and Subscription.name in google.pubsub_v1.types).
_RESOURCE_ID = r"(?!goog)[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}"
TOPIC_NAME_RE = re.compile(
    rf"projects/(?P<project>[^/]+)/topics/(?P<id>{_RESOURCE_ID})"
)
SUBSCRIPTION_NAME_RE = re.compile(
    rf"projects/(?P<project>[^/]+)/subscriptions/(?P<id>{_RESOURCE_ID})"
)
# The topic name Pub/Sub gives a subscription after its topic is deleted.
DELETED_TOPIC = "_deleted-topic_"

DEFAULT_FAILURE_DETAILS = {
    grpc.StatusCode.UNAVAILABLE: "The service is currently unavailable.",
    grpc.StatusCode.PERMISSION_DENIED: "User not authorized to perform this action.",
    grpc.StatusCode.UNAUTHENTICATED: "Request had invalid authentication credentials.",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "Quota exceeded.",
    grpc.StatusCode.DEADLINE_EXCEEDED: "Deadline exceeded.",
    grpc.StatusCode.INTERNAL: "An internal error occurred.",
}


class PeerError(Exception):
    """A request the peer rejects, with the gRPC status code it returns."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass(frozen=True)
class PublishedMessage:
    """One message the peer accepted, as it stored it."""

    topic: str
    message_id: str
    data: bytes
    attributes: dict[str, str]
    ordering_key: str
    publish_time: datetime


@dataclass(frozen=True)
class RecordedCall:
    """One request the peer received and the status code it returned."""

    method: str
    request: Any
    code: grpc.StatusCode


@dataclass
class _Queued:
    """A message waiting in one subscription, delivered or not."""

    message: types.PubsubMessage
    ack_id: str = ""
    # time.monotonic() until which the message is leased to a subscriber; 0 when it
    # is free to deliver.
    lease_until: float = 0.0


@dataclass
class _Subscription:
    config: types.Subscription
    # Keyed by the peer's publish sequence number, so iteration is publish order.
    queue: dict[int, _Queued] = field(default_factory=dict)
    sequence_by_ack_id: dict[str, int] = field(default_factory=dict)


class PeerState:
    """Topics, subscriptions, messages and the request log, behind one lock."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._topics: dict[str, types.Topic] = {}
        self._subscriptions: dict[str, _Subscription] = {}
        self._sequence = itertools.count(1)
        self._failures: deque[tuple[grpc.StatusCode, str]] = deque()
        self._published: list[PublishedMessage] = []
        self._calls: list[RecordedCall] = []
        # Permissions TestIamPermissions leaves out, by topic name. Every other
        # permission asked about an existing topic is granted.
        self._denied: dict[str, set[str]] = {}

    # Test controls.

    def fail_next_publishes(
        self,
        count: int,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        details: str = "",
    ) -> None:
        """Make the next `count` Publish calls fail with `code`, storing nothing."""
        if count < 0:
            raise ValueError(f"count must be 0 or more, not {count}.")
        if code == grpc.StatusCode.OK:
            raise ValueError("code must be an error status, not OK.")
        text = details or DEFAULT_FAILURE_DETAILS.get(code, f"Injected {code.name}.")
        with self._condition:
            self._failures.extend([(code, text)] * count)

    def clear_failures(self) -> None:
        with self._condition:
            self._failures.clear()

    def pending_failures(self) -> int:
        with self._condition:
            return len(self._failures)

    def deny_permissions(self, topic: str, permissions: list[str]) -> None:
        """Make TestIamPermissions on `topic` (a full name) leave out
        `permissions`, such as "pubsub.topics.publish"."""
        with self._condition:
            self._denied.setdefault(topic, set()).update(permissions)

    def reset(self) -> None:
        """Forget every topic, subscription, message, injected failure, denied
        permission and call."""
        with self._condition:
            self._topics.clear()
            self._denied.clear()
            self._subscriptions.clear()
            self._failures.clear()
            self._published.clear()
            self._calls.clear()

    def published(self, topic: str | None = None) -> list[PublishedMessage]:
        """Return the accepted messages, of `topic` or of all topics, oldest first."""
        with self._condition:
            return [m for m in self._published if topic is None or m.topic == topic]

    def calls(self, method: str | None = None) -> list[RecordedCall]:
        """Return the received requests, of `method` (such as "Publish") or all."""
        with self._condition:
            return [c for c in self._calls if method is None or c.method == method]

    def record(self, method: str, request: Any, code: grpc.StatusCode) -> None:
        with self._condition:
            self._calls.append(RecordedCall(method, request, code))

    # Publisher.

    def create_topic(self, topic: types.Topic) -> types.Topic:
        topic_id = _topic_id(topic.name)
        with self._condition:
            if topic.name in self._topics:
                raise _already_exists(topic_id)
            stored = types.Topic(name=topic.name, labels=dict(topic.labels))
            self._topics[topic.name] = stored
            return stored

    def get_topic(self, request: types.GetTopicRequest) -> types.Topic:
        topic_id = _topic_id(request.topic)
        with self._condition:
            if request.topic not in self._topics:
                raise _not_found(topic_id)
            return self._topics[request.topic]

    def delete_topic(self, request: types.DeleteTopicRequest) -> None:
        topic_id = _topic_id(request.topic)
        with self._condition:
            if self._topics.pop(request.topic, None) is None:
                raise _not_found(topic_id)
            for subscription in self._subscriptions.values():
                if subscription.config.topic == request.topic:
                    subscription.config.topic = DELETED_TOPIC

    def publish(self, request: types.PublishRequest, size: int) -> list[str]:
        """Store `request`'s messages in every subscription of its topic.

        `size` is the serialized request's length in bytes.
        """
        with self._condition:
            if self._failures:
                code, details = self._failures.popleft()
                raise PeerError(code, details)
        topic_id = _topic_id(request.topic)
        check_publish_request(request, size)

        with self._condition:
            if request.topic not in self._topics:
                raise _not_found(topic_id)
            subscriptions = [
                subscription
                for subscription in self._subscriptions.values()
                if subscription.config.topic == request.topic
            ]
            message_ids = []
            for message in request.messages:
                sequence = next(self._sequence)
                stored = self._store(request.topic, message, str(sequence))
                for subscription in subscriptions:
                    subscription.queue[sequence] = _Queued(message=stored)
                message_ids.append(stored.message_id)
            self._condition.notify_all()
            return message_ids

    def _store(
        self, topic: str, message: types.PubsubMessage, message_id: str
    ) -> types.PubsubMessage:
        now = datetime.now(UTC)
        stored = types.PubsubMessage(
            data=message.data,
            attributes=dict(message.attributes),
            ordering_key=message.ordering_key,
            message_id=message_id,
            publish_time=now,
        )
        self._published.append(
            PublishedMessage(
                topic=topic,
                message_id=message_id,
                data=message.data,
                attributes=dict(message.attributes),
                ordering_key=message.ordering_key,
                publish_time=now,
            )
        )
        return stored

    # IAMPolicy.

    def test_iam_permissions(
        self, request: iam_policy_pb2.TestIamPermissionsRequest
    ) -> iam_policy_pb2.TestIamPermissionsResponse:
        topic_id = _topic_id(request.resource)
        with self._condition:
            if request.resource not in self._topics:
                raise _not_found(topic_id)
            denied = self._denied.get(request.resource, set())
        granted = [name for name in request.permissions if name not in denied]
        return iam_policy_pb2.TestIamPermissionsResponse(permissions=granted)

    # Subscriber.

    def create_subscription(self, config: types.Subscription) -> types.Subscription:
        subscription_id = _subscription_id(config.name)
        topic_id = _topic_id(config.topic)
        deadline = config.ack_deadline_seconds or DEFAULT_ACK_DEADLINE_SECONDS
        if not DEFAULT_ACK_DEADLINE_SECONDS <= deadline <= MAX_ACK_DEADLINE_SECONDS:
            raise PeerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Invalid ack_deadline_seconds {deadline}: it must be between "
                f"{DEFAULT_ACK_DEADLINE_SECONDS} and {MAX_ACK_DEADLINE_SECONDS}.",
            )
        with self._condition:
            if config.topic not in self._topics:
                raise _not_found(topic_id)
            if config.name in self._subscriptions:
                raise _already_exists(subscription_id)
            stored = types.Subscription(
                name=config.name,
                topic=config.topic,
                ack_deadline_seconds=deadline,
                enable_message_ordering=config.enable_message_ordering,
                labels=dict(config.labels),
            )
            self._subscriptions[config.name] = _Subscription(config=stored)
            return stored

    def get_subscription(
        self, request: types.GetSubscriptionRequest
    ) -> types.Subscription:
        with self._condition:
            return self._subscription(request.subscription).config

    def delete_subscription(self, request: types.DeleteSubscriptionRequest) -> None:
        with self._condition:
            self._subscription(request.subscription)
            del self._subscriptions[request.subscription]

    def pull(
        self, request: types.PullRequest, wait_seconds: float
    ) -> types.PullResponse:
        if request.max_messages <= 0:
            raise PeerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Invalid max_messages {request.max_messages}: it must be 1 or more.",
            )
        give_up_at = time.monotonic() + wait_seconds
        with self._condition:
            while True:
                subscription = self._subscription(request.subscription)
                received = self._lease(subscription, request.max_messages)
                remaining = give_up_at - time.monotonic()
                if received or request.return_immediately or remaining <= 0:
                    return types.PullResponse(received_messages=received)
                # Leases expire without a notification, so wake up now and then.
                self._condition.wait(timeout=min(remaining, 0.1))

    def _lease(
        self, subscription: _Subscription, max_messages: int
    ) -> list[types.ReceivedMessage]:
        """Lease up to `max_messages` messages in publish order.

        With message ordering, a message waits while an earlier message with the same
        ordering key is leased by an earlier Pull, so one key's messages reach
        subscribers in publish order.
        """
        now = time.monotonic()
        ordered = subscription.config.enable_message_ordering
        lease_seconds = subscription.config.ack_deadline_seconds
        blocked_keys: set[str] = set()
        received: list[types.ReceivedMessage] = []
        for sequence, queued in subscription.queue.items():
            if len(received) >= max_messages:
                break
            key = queued.message.ordering_key if ordered else ""
            if queued.lease_until > now:
                if key:
                    blocked_keys.add(key)
                continue
            if key in blocked_keys:
                continue
            subscription.sequence_by_ack_id.pop(queued.ack_id, None)
            queued.ack_id = f"{sequence}-{uuid.uuid4().hex}"
            queued.lease_until = now + lease_seconds
            subscription.sequence_by_ack_id[queued.ack_id] = sequence
            received.append(
                types.ReceivedMessage(ack_id=queued.ack_id, message=queued.message)
            )
        return received

    def acknowledge(self, request: types.AcknowledgeRequest) -> None:
        with self._condition:
            subscription = self._subscription(request.subscription)
            for ack_id in request.ack_ids:
                sequence = subscription.sequence_by_ack_id.pop(ack_id, None)
                if sequence is not None:
                    subscription.queue.pop(sequence, None)
            self._condition.notify_all()

    def modify_ack_deadline(self, request: types.ModifyAckDeadlineRequest) -> None:
        seconds = request.ack_deadline_seconds
        if not 0 <= seconds <= MAX_ACK_DEADLINE_SECONDS:
            raise PeerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Invalid ack_deadline_seconds {seconds}: it must be between 0 and "
                f"{MAX_ACK_DEADLINE_SECONDS}.",
            )
        with self._condition:
            subscription = self._subscription(request.subscription)
            lease_until = time.monotonic() + seconds if seconds else 0.0
            for ack_id in request.ack_ids:
                sequence = subscription.sequence_by_ack_id.get(ack_id)
                if sequence is not None:
                    subscription.queue[sequence].lease_until = lease_until
            self._condition.notify_all()

    def _subscription(self, name: str) -> _Subscription:
        subscription_id = _subscription_id(name)
        subscription = self._subscriptions.get(name)
        if subscription is None:
            raise _not_found(subscription_id)
        return subscription


def check_publish_request(request: types.PublishRequest, size: int) -> None:
    """Raise PeerError(INVALID_ARGUMENT) if Pub/Sub would reject `request`.

    This is the peer's own reading of the limits, written apart from the transport's
    check so that the two test each other.
    """
    if size > MAX_REQUEST_BYTES:
        raise _invalid(
            f"Request payload size {size} exceeds the limit: {MAX_REQUEST_BYTES} bytes."
        )
    if not request.messages:
        raise _invalid("The publish request contains no messages.")

    for index, message in enumerate(request.messages):
        attributes = dict(message.attributes)
        if not message.data and not attributes:
            raise _invalid(
                f"Message {index} is empty: a message needs non-empty data or at "
                "least one attribute."
            )
        if len(attributes) > MAX_ATTRIBUTES:
            raise _invalid(
                f"Message {index} has {len(attributes)} attributes; at most "
                f"{MAX_ATTRIBUTES} are allowed."
            )
        message_size = len(message.data)
        for key, value in attributes.items():
            key_size = len(key.encode())
            value_size = len(value.encode())
            if key_size > MAX_ATTRIBUTE_KEY_BYTES:
                raise _invalid(
                    f"Message {index} has an attribute key of {key_size} bytes; at "
                    f"most {MAX_ATTRIBUTE_KEY_BYTES} bytes are allowed."
                )
            if value_size > MAX_ATTRIBUTE_VALUE_BYTES:
                raise _invalid(
                    f"Message {index} has a value of {value_size} bytes for attribute "
                    f"{key!r}; at most {MAX_ATTRIBUTE_VALUE_BYTES} bytes are allowed."
                )
            message_size += key_size + value_size
        ordering_key_size = len(message.ordering_key.encode())
        if ordering_key_size > MAX_ORDERING_KEY_BYTES:
            raise _invalid(
                f"Message {index} has an ordering key of {ordering_key_size} bytes; "
                f"at most {MAX_ORDERING_KEY_BYTES} bytes are allowed."
            )
        if message_size > MAX_MESSAGE_BYTES:
            raise _invalid(
                f"Message {index} is {message_size} bytes (data and attributes); at "
                f"most {MAX_MESSAGE_BYTES} bytes are allowed."
            )


def _topic_id(name: str) -> str:
    match = TOPIC_NAME_RE.fullmatch(name)
    if match is None:
        raise _invalid(f"Invalid [topics] name: (name={name})")
    return match["id"]


def _subscription_id(name: str) -> str:
    match = SUBSCRIPTION_NAME_RE.fullmatch(name)
    if match is None:
        raise _invalid(f"Invalid [subscriptions] name: (name={name})")
    return match["id"]


def _invalid(details: str) -> PeerError:
    return PeerError(grpc.StatusCode.INVALID_ARGUMENT, details)


def _not_found(resource_id: str) -> PeerError:
    return PeerError(
        grpc.StatusCode.NOT_FOUND, f"Resource not found (resource={resource_id})."
    )


def _already_exists(resource_id: str) -> PeerError:
    return PeerError(
        grpc.StatusCode.ALREADY_EXISTS,
        f"Resource already exists in the project (resource={resource_id}).",
    )


# The gRPC services.


def _unary(
    state: PeerState,
    method: str,
    call: Callable[[Any, grpc.ServicerContext], Any],
    request_type: Any,
    response_type: Any,
    *,
    with_size: bool = False,
) -> grpc.RpcMethodHandler:
    """Wrap `call` as a unary gRPC method that records its request and outcome."""

    def deserialize(raw: bytes) -> Any:
        request = request_type.deserialize(raw)
        return (request, len(raw)) if with_size else request

    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        recorded = request[0] if with_size else request
        try:
            response = call(request, context)
        except PeerError as error:
            state.record(method, recorded, error.code)
            context.abort(error.code, error.details)
        state.record(method, recorded, grpc.StatusCode.OK)
        return response

    return grpc.unary_unary_rpc_method_handler(
        handle,
        request_deserializer=deserialize,
        response_serializer=response_type.serialize,
    )


def _publisher_handler(state: PeerState) -> grpc.GenericRpcHandler:
    def publish(request: tuple[types.PublishRequest, int], _: Any) -> Any:
        message_ids = state.publish(*request)
        return types.PublishResponse(message_ids=message_ids)

    def delete_topic(request: types.DeleteTopicRequest, _: Any) -> Any:
        state.delete_topic(request)
        return _EMPTY

    handlers = {
        "CreateTopic": _unary(
            state,
            "CreateTopic",
            lambda request, _: state.create_topic(request),
            types.Topic,
            types.Topic,
        ),
        "GetTopic": _unary(
            state,
            "GetTopic",
            lambda request, _: state.get_topic(request),
            types.GetTopicRequest,
            types.Topic,
        ),
        "DeleteTopic": _unary(
            state, "DeleteTopic", delete_topic, types.DeleteTopicRequest, _Empty
        ),
        "Publish": _unary(
            state,
            "Publish",
            publish,
            types.PublishRequest,
            types.PublishResponse,
            with_size=True,
        ),
    }
    return grpc.method_handlers_generic_handler("google.pubsub.v1.Publisher", handlers)


def _subscriber_handler(state: PeerState) -> grpc.GenericRpcHandler:
    def pull(request: types.PullRequest, context: grpc.ServicerContext) -> Any:
        remaining = context.time_remaining()
        wait = PULL_WAIT_SECONDS
        if remaining is not None:
            # Answer before the caller's deadline, as Pub/Sub does.
            wait = max(0.0, min(wait, remaining - 0.2))
        return state.pull(request, wait)

    def acknowledge(request: types.AcknowledgeRequest, _: Any) -> Any:
        state.acknowledge(request)
        return _EMPTY

    def modify_ack_deadline(request: types.ModifyAckDeadlineRequest, _: Any) -> Any:
        state.modify_ack_deadline(request)
        return _EMPTY

    def delete_subscription(request: types.DeleteSubscriptionRequest, _: Any) -> Any:
        state.delete_subscription(request)
        return _EMPTY

    handlers = {
        "CreateSubscription": _unary(
            state,
            "CreateSubscription",
            lambda request, _: state.create_subscription(request),
            types.Subscription,
            types.Subscription,
        ),
        "GetSubscription": _unary(
            state,
            "GetSubscription",
            lambda request, _: state.get_subscription(request),
            types.GetSubscriptionRequest,
            types.Subscription,
        ),
        "DeleteSubscription": _unary(
            state,
            "DeleteSubscription",
            delete_subscription,
            types.DeleteSubscriptionRequest,
            _Empty,
        ),
        "Pull": _unary(state, "Pull", pull, types.PullRequest, types.PullResponse),
        "Acknowledge": _unary(
            state, "Acknowledge", acknowledge, types.AcknowledgeRequest, _Empty
        ),
        "ModifyAckDeadline": _unary(
            state,
            "ModifyAckDeadline",
            modify_ack_deadline,
            types.ModifyAckDeadlineRequest,
            _Empty,
        ),
    }
    return grpc.method_handlers_generic_handler("google.pubsub.v1.Subscriber", handlers)


def _iam_handler(state: PeerState) -> grpc.GenericRpcHandler:
    handlers = {
        "TestIamPermissions": _unary(
            state,
            "TestIamPermissions",
            lambda request, _: state.test_iam_permissions(request),
            _Protobuf(iam_policy_pb2.TestIamPermissionsRequest),
            _Protobuf(iam_policy_pb2.TestIamPermissionsResponse),
        ),
    }
    return grpc.method_handlers_generic_handler("google.iam.v1.IAMPolicy", handlers)


class _Protobuf:
    """Gives a plain protobuf class, such as google.iam.v1's, the serialize and
    deserialize methods of the proto-plus types that `_unary` expects."""

    def __init__(self, message_type: Any) -> None:
        self.message_type = message_type

    def deserialize(self, raw: bytes) -> Any:
        return self.message_type.FromString(raw)

    @staticmethod
    def serialize(message: Any) -> bytes:
        return bytes(message.SerializeToString())


class _Empty:
    """google.protobuf.Empty on the wire: zero bytes."""

    @staticmethod
    def serialize(_: object) -> bytes:
        return b""


_EMPTY = _Empty()


def _admin_handler(state: PeerState) -> grpc.GenericRpcHandler:
    """JSON-over-gRPC controls for a peer running in another process."""

    def fail_next_publishes(request: dict[str, Any], context: Any) -> dict[str, Any]:
        try:
            code = grpc.StatusCode[str(request.get("code", "UNAVAILABLE"))]
            state.fail_next_publishes(
                int(request.get("count", 1)), code, str(request.get("details", ""))
            )
        except (KeyError, ValueError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid request: {error}")
        return {"pending_failures": state.pending_failures()}

    def reset(request: dict[str, Any], context: Any) -> dict[str, Any]:
        state.reset()
        return {}

    def deny_permissions(request: dict[str, Any], context: Any) -> dict[str, Any]:
        state.deny_permissions(
            str(request.get("topic", "")),
            [str(p) for p in request.get("permissions", [])],
        )
        return {}

    def json_handler(call: Callable[..., Any]) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=lambda raw: json.loads(raw or b"{}"),
            response_serializer=lambda value: json.dumps(value).encode(),
        )

    return grpc.method_handlers_generic_handler(
        ADMIN_SERVICE,
        {
            "FailNextPublishes": json_handler(fail_next_publishes),
            "Reset": json_handler(reset),
            "DenyPermissions": json_handler(deny_permissions),
        },
    )


def admin_call(endpoint: str, method: str, request: dict[str, Any]) -> dict[str, Any]:
    """Call the peer's admin `method` ("FailNextPublishes", "Reset" or
    "DenyPermissions") at `endpoint`."""
    with grpc.insecure_channel(endpoint) as channel:
        call = channel.unary_unary(
            f"/{ADMIN_SERVICE}/{method}",
            request_serializer=lambda value: json.dumps(value).encode(),
            response_deserializer=json.loads,
        )
        result: dict[str, Any] = call(request, timeout=10)
        return result


# Starting and stopping.


@dataclass
class PubSubPeer:
    """A running peer; `stop()` ends it.

    `state` is there only when the peer runs in this process. The failure switch and
    `reset()` work in both cases, through the admin service when it runs in a child.
    """

    host: str
    port: int
    state: PeerState | None = None
    _server: grpc.Server | None = field(default=None, repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        """host:port, the value PUBSUB_EMULATOR_HOST takes."""
        return f"{self.host}:{self.port}"

    def fail_next_publishes(
        self,
        count: int,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        details: str = "",
    ) -> None:
        """Make the next `count` Publish calls fail with `code`."""
        if self.state is not None:
            self.state.fail_next_publishes(count, code, details)
            return
        admin_call(
            self.endpoint,
            "FailNextPublishes",
            {"count": count, "code": code.name, "details": details},
        )

    def deny_permissions(self, topic: str, permissions: list[str]) -> None:
        """Make TestIamPermissions on `topic` (a full name) leave out
        `permissions`."""
        if self.state is not None:
            self.state.deny_permissions(topic, permissions)
            return
        admin_call(
            self.endpoint,
            "DenyPermissions",
            {"topic": topic, "permissions": list(permissions)},
        )

    def reset(self) -> None:
        if self.state is not None:
            self.state.reset()
        else:
            admin_call(self.endpoint, "Reset", {})

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None
        if self._process is not None:
            stop_process(self._process)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None


def start_pubsub_peer(
    host: str = "127.0.0.1", port: int = 0, *, in_process: bool = True
) -> PubSubPeer:
    """Start the peer on `host`:`port` (0 picks a free port) and wait for it.

    In process, the server runs on threads of this program. Otherwise it is a
    `python -m delivery.peers.pubsub` child, which keeps its work off this
    process's interpreter lock.
    """
    if in_process:
        state = PeerState()
        server = serve(state, host, port)
        return PubSubPeer(
            host=host, port=server.bound_port, state=state, _server=server.server
        )
    return _start_subprocess(host, port)


@dataclass(frozen=True)
class _Serving:
    server: grpc.Server
    bound_port: int


def serve(state: PeerState, host: str, port: int) -> _Serving:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="pubsub-peer"),
        options=[
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
            # A port still in use must make the start fail, not be shared.
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers(
        (
            _publisher_handler(state),
            _subscriber_handler(state),
            _iam_handler(state),
            _admin_handler(state),
        )
    )
    try:
        bound_port = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as error:
        raise RuntimeError(f"Could not listen on {host}:{port}: {error}") from error
    if bound_port == 0:
        raise RuntimeError(f"Could not listen on {host}:{port}.")
    server.start()
    return _Serving(server=server, bound_port=bound_port)


def _start_subprocess(host: str, port: int, timeout: float = 30.0) -> PubSubPeer:
    if port == 0:
        port = free_port(host)
    project_root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "delivery.peers.pubsub"]
    # A file, not a pipe, because a pipe that is never read fills up and stalls the
    # peer.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by PubSubPeer.stop()
    process = subprocess.Popen(
        [*command, "--host", host, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=project_root,
    )
    peer = PubSubPeer(host=host, port=port, _process=process, _log=log)
    wait_until_ready(
        "The Pub/Sub peer",
        process,
        log,
        lambda: _accepts_connections(host, port),
        timeout,
        on_failure=peer.stop,
    )
    return peer


def wait_until_ready(
    name: str,
    process: subprocess.Popen[bytes],
    log: IO[bytes],
    ready: Callable[[], bool],
    timeout: float,
    on_failure: Callable[[], None],
) -> None:
    """Poll `ready` until it is true; stop and raise if `process` exits first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace").strip()
            on_failure()
            raise RuntimeError(
                f"{name} exited with status {process.returncode} before it was "
                f"ready: {output[-2000:]}"
            )
        if time.monotonic() > deadline:
            on_failure()
            raise RuntimeError(f"{name} was not ready within {timeout:g} s.")
        time.sleep(0.1)


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate a child process, kill it if it outlives 10 s, and reap it."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


# Clients for tests and scripts, connected without PUBSUB_EMULATOR_HOST.


def publisher_client(
    endpoint: str, *, ordering: bool = False
) -> pubsub_v1.PublisherClient:
    """Return a publisher for the peer or emulator at `endpoint` (host:port)."""
    channel = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
    return pubsub_v1.PublisherClient(
        publisher_options=pubsub_v1.types.PublisherOptions(
            enable_message_ordering=ordering
        ),
        transport=PublisherGrpcTransport(host=endpoint, channel=channel),
    )


def subscriber_client(endpoint: str) -> pubsub_v1.SubscriberClient:
    """Return a subscriber for the peer or emulator at `endpoint` (host:port)."""
    channel = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
    return pubsub_v1.SubscriberClient(
        transport=SubscriberGrpcTransport(host=endpoint, channel=channel)
    )


def create_topic(endpoint: str, project: str, topic_id: str) -> str:
    """Create a topic and return its full name, projects/PROJECT/topics/TOPIC."""
    name = f"projects/{project}/topics/{topic_id}"
    publisher = publisher_client(endpoint)
    try:
        publisher.create_topic(name=name)
    finally:
        publisher.transport.close()
    return name


def create_subscription(
    endpoint: str, topic: str, subscription_id: str, *, ordering: bool = False
) -> str:
    """Create a pull subscription to `topic` (a full name) and return its full
    name. With `ordering`, messages of one ordering key arrive in publish order."""
    project = TOPIC_NAME_RE.fullmatch(topic)
    if project is None:
        raise ValueError(f"{topic!r} is not a topic name projects/PROJECT/topics/ID.")
    name = f"projects/{project['project']}/subscriptions/{subscription_id}"
    with subscriber_client(endpoint) as subscriber:
        subscriber.create_subscription(
            request={"name": name, "topic": topic, "enable_message_ordering": ordering}
        )
    return name


def pull_messages(
    endpoint: str, subscription: str, count: int, *, timeout: float = 30.0
) -> list[types.PubsubMessage]:
    """Pull and acknowledge messages until `count` have arrived, in arrival order.

    Raises TimeoutError with what did arrive when `timeout` seconds pass first.
    """
    received: list[types.PubsubMessage] = []
    deadline = time.monotonic() + timeout
    with subscriber_client(endpoint) as subscriber:
        while len(received) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(received)} of {count} messages arrived on {subscription} "
                    f"within {timeout:g} s."
                )
            for batch in _pull_once(subscriber, subscription, count - len(received)):
                received.extend(item.message for item in batch)
                subscriber.acknowledge(
                    subscription=subscription,
                    ack_ids=[item.ack_id for item in batch],
                )
    return received


def _pull_once(
    subscriber: pubsub_v1.SubscriberClient, subscription: str, max_messages: int
) -> Iterator[list[types.ReceivedMessage]]:
    try:
        response = subscriber.pull(
            subscription=subscription, max_messages=max_messages, retry=None, timeout=5
        )
    except api_exceptions.DeadlineExceeded:
        # A server may hold an empty Pull open until the deadline.
        return
    if response.received_messages:
        yield list(response.received_messages)


def peer_environment(endpoint: str) -> dict[str, str]:
    """Return the environment variables that send both stages' publishes to the
    peer at `endpoint`."""
    environment = {
        f"{stage}_PUBSUB_EMULATOR_HOST": endpoint for stage in ("TEST", "PROD")
    }
    # Clients built outside the stage settings still reach the peer, never Google.
    environment["PUBSUB_EMULATOR_HOST"] = endpoint
    return environment


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m delivery.peers.pubsub",
        description="Run the local Pub/Sub peer until interrupted.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument(
        "--port", type=int, default=8085, help="Port to listen on; 0 picks one."
    )
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    state = PeerState()
    serving = serve(state, arguments.host, arguments.port)
    logger.info(
        "Pub/Sub peer listening on %s:%d; set PUBSUB_EMULATOR_HOST=%s:%d",
        arguments.host,
        serving.bound_port,
        arguments.host,
        serving.bound_port,
    )
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    with contextlib.suppress(KeyboardInterrupt):
        stopped.wait()
    serving.server.stop(grace=1).wait()
    logger.info("Pub/Sub peer stopped.")


__all__ = [
    "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTE_KEY_BYTES",
    "MAX_ATTRIBUTE_VALUE_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_ORDERING_KEY_BYTES",
    "MAX_REQUEST_BYTES",
    "PeerError",
    "PeerState",
    "PubSubPeer",
    "PublishedMessage",
    "RecordedCall",
    "admin_call",
    "create_subscription",
    "create_topic",
    "free_port",
    "peer_environment",
    "publisher_client",
    "pull_messages",
    "start_pubsub_peer",
    "stop_process",
    "subscriber_client",
    "wait_until_ready",
]


if __name__ == "__main__":
    main()
