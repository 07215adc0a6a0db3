"""The proton event handler that makes an AMQP listener respond to a sending client as
a Service Bus namespace does.

Per sender, azure-servicebus 7.15 first authenticates with SASL ANONYMOUS. It then
opens a link pair on `$cbs` for one put-token request and its status code response,
and last a sender link whose target is amqps://HOST:PORT/ENTITY. Every method runs on
the peer's network thread.
"""

import logging
import threading
import uuid
from typing import Any

from proton import (
    Condition,
    Connection,
    Delivery,
    Disposition,
    Endpoint,
    Event,
    Handler,
    Link,
    Message,
    Terminus,
    symbol,
)
from proton._reactor import Acceptor, Container

from .codec import DecodeError, decode_transfer
from .sas import TokenRejected, VerifiedToken, entity_path, verify_token
from .state import (
    FailureAction,
    InjectedFailure,
    PeerState,
    RecordedMessage,
    TokenRequest,
)

logger = logging.getLogger("delivery.peers.servicebus")

CBS_ADDRESS = "$cbs"
# Credit granted to each sending client; topped up when half is used.
LINK_CREDIT = 1000
STOP_EVENT = "peer_stop"
DETACH_EVENT = "peer_detach_senders"

NOT_FOUND = "amqp:not-found"
UNAUTHORIZED_ACCESS = "amqp:unauthorized-access"
NOT_ALLOWED = "amqp:not-allowed"
NOT_IMPLEMENTED = "amqp:not-implemented"
DECODE_ERROR = "amqp:decode-error"
MESSAGE_SIZE_EXCEEDED = "amqp:link:message-size-exceeded"
INTERNAL_ERROR = "amqp:internal-error"
DETACH_FORCED = "amqp:link:detach-forced"
IDLE_DETACH_DESCRIPTION = (
    "The link is force detached. Details: AmqpMessagePublisher.IdleTimerExpired: "
    "Idle timeout: 00:10:00."
)
# Service Bus rejects a message without a session id on an entity that requires
# sessions with amqp:not-allowed and this text, an InvalidOperationException in its
# .NET clients. azure-servicebus 7.15 raises it as a ServiceBusError it does not retry.
SESSION_REQUIRED_DESCRIPTION = (
    "The SessionId was not set on a message, and it cannot be sent to the entity. "
    "Entities that have session support enabled can only receive messages that have "
    "the SessionId set to a valid value."
)
# The info map of an AMQP error. azure-servicebus 7.15 reads the third field of a
# rejection's error, so a rejection without it leaves `send_messages` waiting.
TRACKING_ID = symbol("com.microsoft:tracking-id")

# The connection attribute that contains the connection's accepted tokens, by entity
# path.
TOKENS_ATTRIBUTE = "servicebus_tokens"


class _DisconnectNoise(logging.Filter):
    """Drops proton's error records for a client that closed its socket first, which
    azure-servicebus does each time it closes a sender."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (
            text.startswith(("Couldn't send: ", "Couldn't recv: "))
            and ("BrokenPipeError" in text or "ConnectionResetError" in text)
        )


DISCONNECT_NOISE = _DisconnectNoise()


def quiet_proton_disconnects() -> None:
    """Stop proton from logging an error for every client that disconnects."""
    proton_logger = logging.getLogger("proton")
    if DISCONNECT_NOISE not in proton_logger.filters:
        proton_logger.addFilter(DISCONNECT_NOISE)


class PeerHandler(Handler):
    def __init__(self, state: PeerState, host: str) -> None:
        super().__init__()
        self.state = state
        self.host = host
        self.port = 0
        self.acceptor: Acceptor | None = None
        self.container: Container | None = None
        self.connections: list[Connection] = []

    def resource_uri(self, path: str) -> str:
        return f"sb://{self.host}:{self.port}/{path}"

    # Connections and sessions

    def on_connection_bound(self, event: Event) -> None:
        if event.transport is not None:
            event.transport.sasl().allowed_mechs("ANONYMOUS")

    def on_connection_remote_open(self, event: Event) -> None:
        connection = event.connection
        if connection is None or not connection.state & Endpoint.LOCAL_UNINIT:
            return
        setattr(connection, TOKENS_ATTRIBUTE, {})
        self.connections = [
            known
            for known in self.connections
            if not known.state & Endpoint.LOCAL_CLOSED
        ]
        self.connections.append(connection)
        self.state.count_connection()
        connection.open()

    def on_connection_remote_close(self, event: Event) -> None:
        connection = event.connection
        if connection is not None and not connection.state & Endpoint.LOCAL_CLOSED:
            connection.close()

    def on_session_remote_open(self, event: Event) -> None:
        session = event.session
        if session is not None and session.state & Endpoint.LOCAL_UNINIT:
            session.open()

    def on_session_remote_close(self, event: Event) -> None:
        session = event.session
        if session is not None and not session.state & Endpoint.LOCAL_CLOSED:
            session.close()

    def on_transport_error(self, event: Event) -> None:
        if event.transport is not None:
            logger.debug(
                "Service Bus peer transport error: %s", event.transport.condition
            )

    # Links

    def on_link_remote_open(self, event: Event) -> None:
        link = event.link
        if link is None or not link.state & Endpoint.LOCAL_UNINIT:
            return
        self.state.count_attach()
        try:
            if link.is_sender:
                self._attach_outgoing(link)
            else:
                self._attach_incoming(link)
        except Exception:
            # An exception escaping a handler would stop the whole peer.
            logger.exception("Service Bus peer failed to attach link %s", link.name)
            self._reject_attach(
                link, INTERNAL_ERROR, "The peer failed to attach the link."
            )

    def on_link_remote_close(self, event: Event) -> None:
        link = event.link
        if link is not None and not link.state & Endpoint.LOCAL_CLOSED:
            link.close()

    def _attach_outgoing(self, link: Link) -> None:
        """Attach a link on which the client receives: only $cbs replies."""
        if link.remote_source.address == CBS_ADDRESS:
            self._accept(link)
            return
        self._reject_attach(
            link,
            NOT_IMPLEMENTED,
            "This peer only accepts sends; receiving from "
            f"{link.remote_source.address!r} is not supported.",
        )

    def _attach_incoming(self, link: Link) -> None:
        """Attach a link on which the client sends: $cbs or a known entity."""
        address = link.remote_target.address or ""
        if address == CBS_ADDRESS:
            self._accept(link)
            link.flow(LINK_CREDIT)
            return

        path = entity_path(address)
        entity = self.state.entity(path)
        if entity is None:
            self._reject_attach(
                link,
                NOT_FOUND,
                f"The messaging entity '{self.resource_uri(path)}' could not be found.",
            )
            return

        token = self._token(link.connection, path)
        if token is None or not token.rights & {"Send", "Manage"}:
            logger.info(
                "Service Bus peer rejected a sender link on %s: no token with Send",
                path,
            )
            self._reject_attach(
                link,
                UNAUTHORIZED_ACCESS,
                "Unauthorized access. 'Send' claim(s) are required to perform this "
                f"operation. Resource: '{self.resource_uri(path)}'.",
            )
            return

        self._accept(link)
        # Service Bus announces the entity's maximum on the attach; the client sizes
        # its batches by it.
        link.max_message_size = entity.max_message_size
        link.flow(LINK_CREDIT)

    def _token(self, connection: Connection, path: str) -> VerifiedToken | None:
        tokens: dict[str, VerifiedToken] = getattr(connection, TOKENS_ATTRIBUTE, {})
        return tokens.get(path)

    @staticmethod
    def _accept(link: Link) -> None:
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.open()

    @staticmethod
    def _reject_attach(link: Link, condition: str, description: str) -> None:
        """Respond to the attach with a null terminus, then detach with `condition`.

        Service Bus rejects a link this way. A client that sees its terminus echoed
        first takes the link as attached and retries into a connection error.
        """
        if link.is_sender:
            link.source.type = Terminus.UNSPECIFIED
            link.target.copy(link.remote_target)
        else:
            link.source.copy(link.remote_source)
            link.target.type = Terminus.UNSPECIFIED
        link.open()
        link.condition = Condition(condition, description, _error_info())
        link.close()

    # Deliveries

    def on_delivery(self, event: Event) -> None:
        delivery = event.delivery
        if delivery is None:
            return
        link = delivery.link
        if link.is_sender:
            # A put-token reply the client has settled.
            if delivery.remote_state or delivery.remotely_settled:
                delivery.settle()
            return
        if not delivery.readable or delivery.partial:
            return

        raw = link.recv(delivery.pending) or b""
        link.advance()
        if link.state & Endpoint.LOCAL_CLOSED:
            # Sent before the client read our detach: Service Bus drops it too.
            delivery.settle()
            return
        try:
            if link.target.address == CBS_ADDRESS:
                self._answer_put_token(delivery, raw)
            else:
                self._receive(delivery, raw)
        except Exception:
            logger.exception("Service Bus peer failed to handle a delivery")
            if not delivery.settled:
                _reject(delivery, INTERNAL_ERROR, "The peer failed to handle it.")

        if link.state & Endpoint.LOCAL_ACTIVE and link.credit < LINK_CREDIT // 2:
            link.flow(LINK_CREDIT - link.credit)

    def _answer_put_token(self, delivery: Delivery, raw: bytes) -> None:
        request = Message()
        request.decode(raw)
        delivery.update(Disposition.ACCEPTED)
        delivery.settle()

        properties: dict[str, Any] = request.properties or {}
        audience = str(properties.get("name") or "")
        body = request.body
        token = body.decode() if isinstance(body, bytes | memoryview) else str(body)
        key_name: str | None = None
        if properties.get("operation") != "put-token":
            status, description = 400, "The $cbs node supports put-token only."
        else:
            try:
                verified = verify_token(token, audience, self.state.policies_snapshot())
            except TokenRejected as rejection:
                status, description = 401, rejection.description
                key_name = rejection.key_name
            else:
                status, description = 202, "Accepted"
                key_name = verified.key_name
                tokens = getattr(delivery.link.connection, TOKENS_ATTRIBUTE, {})
                tokens[entity_path(audience)] = verified

        logger.info(
            "Service Bus peer put-token for %s with key name %s: %d",
            audience,
            key_name,
            status,
        )
        self.state.record_token_request(TokenRequest(audience, key_name, status))
        reply = Message(
            correlation_id=request.id,
            properties={"status-code": status, "status-description": description},
        )
        sender = _cbs_sender(delivery.link.connection)
        if sender is None:
            logger.warning("Service Bus peer has no $cbs link for a put-token response")
            return
        sender.send(reply)

    def _receive(self, delivery: Delivery, raw: bytes) -> None:
        link = delivery.link
        path = entity_path(link.target.address or "")
        entity = self.state.entity(path)
        if entity is None:
            _reject(
                delivery,
                NOT_FOUND,
                f"The messaging entity '{self.resource_uri(path)}' could not be found.",
            )
            return

        failure = self.state.take_failure(entity)
        if failure is not None:
            self._fail(delivery, path, failure)
            return

        if len(raw) > entity.max_message_size:
            _reject(
                delivery,
                MESSAGE_SIZE_EXCEEDED,
                f"The received message (size: {len(raw)} bytes) exceeds the limit "
                f"({entity.max_message_size} bytes) currently allowed on the link.",
            )
            return

        try:
            batched, messages = decode_transfer(raw)
        except DecodeError as error:
            _reject(delivery, DECODE_ERROR, f"The message cannot be decoded: {error}.")
            return

        if entity.requires_session and any(not m.session_id for m in messages):
            _reject(delivery, NOT_ALLOWED, SESSION_REQUIRED_DESCRIPTION)
            return

        self.state.record_messages(
            RecordedMessage(
                entity=entity.name,
                message_id=message.message_id,
                session_id=message.session_id,
                partition_key=message.partition_key,
                content_type=message.content_type,
                subject=message.subject,
                correlation_id=message.correlation_id,
                application_properties=message.application_properties,
                body=message.body,
                batched=batched,
                transfer_size=len(raw),
            )
            for message in messages
        )
        delivery.update(Disposition.ACCEPTED)
        delivery.settle()
        logger.info(
            "Service Bus peer accepted %d message(s) for %s in %d bytes: %s",
            len(messages),
            entity.name,
            len(raw),
            ", ".join(str(message.message_id) for message in messages),
        )

    @staticmethod
    def _fail(delivery: Delivery, path: str, failure: InjectedFailure) -> None:
        logger.info(
            "Service Bus peer fails a send to %s (%s %s) on request",
            path,
            failure.action,
            failure.condition,
        )
        if failure.action == FailureAction.DETACH:
            link = delivery.link
            link.condition = Condition(
                failure.condition, failure.description, _error_info()
            )
            link.close()
        elif failure.action == FailureAction.REJECT:
            _reject(delivery, failure.condition, failure.description)
        # FailureAction.IGNORE leaves the delivery unsettled until the link closes.

    def on_peer_detach_senders(self, event: Event) -> None:
        """Detach every entity link clients send on, as Service Bus detaches a sender
        link that was idle for 10 minutes."""
        for connection in self.connections:
            link = connection.link_head(Endpoint.LOCAL_ACTIVE)
            while link:
                following = link.next(Endpoint.LOCAL_ACTIVE)
                if link.is_receiver and link.target.address != CBS_ADDRESS:
                    link.condition = Condition(
                        DETACH_FORCED, IDLE_DETACH_DESCRIPTION, _error_info()
                    )
                    link.close()
                link = following
        if isinstance(event.subject, threading.Event):
            event.subject.set()

    # Stopping

    def on_peer_stop(self, event: Event) -> None:
        """Close the listener and every connection, then end the event loop."""
        if self.acceptor is not None:
            self.acceptor.close()
        for connection in self.connections:
            if not connection.state & Endpoint.LOCAL_CLOSED:
                connection.close()
        self.connections = []
        if self.container is not None:
            self.container.stop()


def _error_info() -> dict[Any, Any]:
    return {TRACKING_ID: str(uuid.uuid4())}


def _reject(delivery: Delivery, condition: str, description: str) -> None:
    delivery.local.condition = Condition(condition, description, _error_info())
    delivery.update(Disposition.REJECTED)
    delivery.settle()


def _cbs_sender(connection: Connection) -> Link | None:
    link = connection.link_head(Endpoint.LOCAL_ACTIVE)
    while link:
        if link.is_sender and link.source.address == CBS_ADDRESS:
            return link
        link = link.next(Endpoint.LOCAL_ACTIVE)
    return None
