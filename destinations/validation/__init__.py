"""Validation of each destination kind's configuration, one module per kind.

Each kind's `validate(destination)` normalises the instance in place and raises one
ValidationError keyed by model field name, holding every problem it found, so the
admin shows each message next to its field.
"""

from collections.abc import Callable

from django.core.exceptions import ValidationError
from django.utils.text import capfirst

from ..models import Destination, Kind
from ..pasted_secrets import describe_secret, secret_error
from . import pubsub, servicebus, sqs

VALIDATORS: dict[str, Callable[[Destination], None]] = {
    Kind.SQS: sqs.validate,
    Kind.PUBSUB: pubsub.validate,
    Kind.SERVICEBUS: servicebus.validate,
}

# For each plain text field that staff type into, what to enter there instead of a
# secret. Every kind's fields are listed, because the other kinds' are reset anyway.
PASTE_HINTS: dict[str, str] = {
    "name": "Enter a name for the destination, such as Orders to the warehouse.",
    **sqs.PASTE_HINTS,
    **pubsub.PASTE_HINTS,
    **servicebus.PASTE_HINTS,
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
    secrets = take_pasted_secrets(destination)
    try:
        validate_retry_policy(destination)
        validator(destination)
    except ValidationError as error:
        if not secrets:
            raise
        # A field blanked for its secret may also be reported as missing: its own
        # error replaces that.
        raise ValidationError({**error.update_error_dict({}), **secrets}) from None
    if secrets:
        raise ValidationError(secrets)


def take_pasted_secrets(destination: Destination) -> dict[str, list[ValidationError]]:
    """Blank each plain field of `destination` that looks like a secret, and return
    an error for each, keyed by field.

    The kind's validator then never receives the secret, so none of its messages can
    quote it, not even one about another field.
    """
    errors = {}
    for name, hint in PASTE_HINTS.items():
        value = getattr(destination, name)
        description = describe_secret(value) if isinstance(value, str) else None
        if description is None:
            continue
        field = Destination._meta.get_field(name)
        label = capfirst(str(getattr(field, "verbose_name", name)))
        errors[name] = [secret_error(label, description, hint)]
        setattr(destination, name, "")
    return errors


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
