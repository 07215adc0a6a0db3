"""Validation of each destination kind's configuration, one module per kind.

Each kind's `validate(destination)` normalises the instance in place and raises one
ValidationError keyed by model field name, holding every problem it found, so the
admin shows each message next to its field.
"""

from collections.abc import Callable

from django.core.exceptions import ValidationError

from ..models import Destination, Kind
from . import pubsub, servicebus, sqs

VALIDATORS: dict[str, Callable[[Destination], None]] = {
    Kind.SQS: sqs.validate,
    Kind.PUBSUB: pubsub.validate,
    Kind.SERVICEBUS: servicebus.validate,
}

FIELD_PREFIXES: dict[str, str] = {
    Kind.SQS: "sqs_",
    Kind.PUBSUB: "pubsub_",
    Kind.SERVICEBUS: "servicebus_",
}


def validate_destination(destination: Destination) -> None:
    """Check and normalise `destination`; raise ValidationError keyed by field."""
    validator = VALIDATORS.get(destination.kind)
    if validator is None:
        # The field's own choices check already reports an unknown or blank kind.
        return

    reset_other_kinds(destination)
    validate_retry_policy(destination)
    validator(destination)


def validate_retry_policy(destination: Destination) -> None:
    initial = destination.retry_initial_delay
    longest = destination.retry_max_delay
    if initial is not None and longest is not None and longest < initial:
        raise ValidationError(
            {
                "retry_max_delay": (
                    f"The longest wait between retries ({longest} s) is shorter than "
                    f"the first retry's wait ({initial} s). Set it to at least "
                    f"{initial} s."
                )
            }
        )


def reset_other_kinds(destination: Destination) -> None:
    """Set the columns of every other kind back to their defaults.

    A destination switched from Service Bus to SQS must not keep the old connection
    string, and the columns of other kinds should not show up in lists or exports.
    """
    other_prefixes = tuple(
        prefix for kind, prefix in FIELD_PREFIXES.items() if kind != destination.kind
    )
    for field in Destination._meta.concrete_fields:
        if field.name.startswith(other_prefixes):
            setattr(destination, field.attname, field.get_default())

    if destination.kind != Kind.SERVICEBUS:
        destination._new_connection_string = None
