"""Decoding of AMQP 1.0 messages as they arrive in a transfer, batches included.

An AMQP message is a sequence of described sections (header, annotations, properties,
application properties, body). A Service Bus batch, message format 0x80013700, is one
such message whose body is one data section per inner message, each holding a whole
encoded message. proton's Message class keeps only one data section of a body, so
this module walks the sections itself with proton's Data codec.
"""

from dataclasses import dataclass, field
from typing import Any

from proton import Data, Described

HEADER = 0x70
DELIVERY_ANNOTATIONS = 0x71
MESSAGE_ANNOTATIONS = 0x72
PROPERTIES = 0x73
APPLICATION_PROPERTIES = 0x74
DATA = 0x75
AMQP_SEQUENCE = 0x76
AMQP_VALUE = 0x77
FOOTER = 0x78

# The symbolic descriptors a sender may use instead of the numeric ones.
SYMBOLIC_DESCRIPTORS = {
    "amqp:header:list": HEADER,
    "amqp:delivery-annotations:map": DELIVERY_ANNOTATIONS,
    "amqp:message-annotations:map": MESSAGE_ANNOTATIONS,
    "amqp:properties:list": PROPERTIES,
    "amqp:application-properties:map": APPLICATION_PROPERTIES,
    "amqp:data:binary": DATA,
    "amqp:amqp-sequence:list": AMQP_SEQUENCE,
    "amqp:amqp-value:*": AMQP_VALUE,
    "amqp:footer:map": FOOTER,
}
BODY_SECTIONS = {DATA, AMQP_SEQUENCE, AMQP_VALUE}

# Positions in the properties section (AMQP 1.0 part 3, section 3.2.4).
MESSAGE_ID = 0
SUBJECT = 3
CORRELATION_ID = 5
CONTENT_TYPE = 6
GROUP_ID = 10

PARTITION_KEY_ANNOTATION = "x-opt-partition-key"


class DecodeError(ValueError):
    """The bytes are not an AMQP message."""


@dataclass(frozen=True)
class DecodedMessage:
    message_id: str | None
    # Service Bus's session id travels as the AMQP group-id.
    session_id: str | None
    partition_key: str | None
    content_type: str | None
    subject: str | None
    correlation_id: str | None
    annotations: dict[str, Any] = field(default_factory=dict)
    application_properties: dict[str, Any] = field(default_factory=dict)
    # The data sections joined; an amqp-value of text or binary as its bytes.
    body: bytes = b""
    # The body of an amqp-value or amqp-sequence section, decoded.
    value: Any = None
    data_sections: tuple[bytes, ...] = ()


def decode_sections(raw: bytes) -> list[tuple[int, Any]]:
    """Split an encoded message into (section code, value) pairs; raise DecodeError."""
    sections = []
    view = memoryview(raw)
    while len(view):
        data = Data()
        try:
            consumed = data.decode(bytes(view))
        except Exception as error:  # proton raises DataException and others
            raise DecodeError(f"invalid AMQP encoding: {error}") from error
        if consumed <= 0:
            raise DecodeError("an AMQP section of zero bytes")
        data.rewind()
        data.next()
        section = data.get_object()
        if not isinstance(section, Described):
            raise DecodeError("a value that is not a described message section")
        # Copied now: a binary value is a memoryview into `data`, freed with it.
        sections.append((_section_code(section.descriptor), _plain(section.value)))
        view = view[consumed:]
    return sections


def decode_message(raw: bytes) -> DecodedMessage:
    """Decode one encoded AMQP message; raise DecodeError."""
    properties: list[Any] = []
    annotations: dict[str, Any] = {}
    application_properties: dict[str, Any] = {}
    data_sections: list[bytes] = []
    value: Any = None
    for code, section in decode_sections(raw):
        if code == PROPERTIES:
            properties = list(section or [])
        elif code == MESSAGE_ANNOTATIONS:
            annotations = _string_keys(section)
        elif code == APPLICATION_PROPERTIES:
            application_properties = _string_keys(section)
        elif code == DATA:
            data_sections.append(bytes(section))
        elif code in (AMQP_VALUE, AMQP_SEQUENCE):
            value = _plain(section)

    if data_sections:
        body = b"".join(data_sections)
    elif isinstance(value, bytes):
        body = value
    elif isinstance(value, str):
        body = value.encode()
    else:
        body = b""

    partition_key = annotations.get(PARTITION_KEY_ANNOTATION)
    return DecodedMessage(
        message_id=_text(_field(properties, MESSAGE_ID)),
        session_id=_text(_field(properties, GROUP_ID)),
        partition_key=None if partition_key is None else str(partition_key),
        content_type=_text(_field(properties, CONTENT_TYPE)),
        subject=_text(_field(properties, SUBJECT)),
        correlation_id=_text(_field(properties, CORRELATION_ID)),
        annotations=annotations,
        application_properties=application_properties,
        body=body,
        value=value,
        data_sections=tuple(data_sections),
    )


def decode_transfer(raw: bytes) -> tuple[bool, list[DecodedMessage]]:
    """Decode the payload of a transfer into its messages, and whether it was a batch.

    NOTE: proton 0.40's Python binding does not expose a delivery's message format,
    so a batch is recognised by its shape: a body of data sections that each decode as
    a whole AMQP message. A plain message whose binary body happens to be an encoded
    AMQP message would be taken for a batch; a JSON or text body never is.
    """
    envelope = decode_message(raw)
    if envelope.data_sections and envelope.value is None:
        try:
            inner = [decode_message(section) for section in envelope.data_sections]
        except DecodeError:
            return False, [envelope]
        if all(_has_body(section) for section in envelope.data_sections):
            return True, inner
    return False, [envelope]


def _has_body(raw: bytes) -> bool:
    return any(code in BODY_SECTIONS for code, _ in decode_sections(raw))


def _section_code(descriptor: Any) -> int:
    if isinstance(descriptor, int) and HEADER <= descriptor <= FOOTER:
        return int(descriptor)
    if isinstance(descriptor, str) and descriptor in SYMBOLIC_DESCRIPTORS:
        return SYMBOLIC_DESCRIPTORS[descriptor]
    raise DecodeError(f"the descriptor {descriptor!r} is not a message section")


def _field(values: list[Any], index: int) -> Any:
    return values[index] if index < len(values) else None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode(errors="replace")
    return str(value)


def _string_keys(section: Any) -> dict[str, Any]:
    if not isinstance(section, dict):
        return {}
    return {str(key): _plain(value) for key, value in section.items()}


def _plain(value: Any) -> Any:
    """Copy each memoryview proton returns into bytes of their own."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
