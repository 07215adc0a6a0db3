"""Destination values as staff may see them: secrets replaced by a marker.

The change history and any export call these instead of reading a field directly,
so a secret column can only ever show as "set" or empty, never its token.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.exceptions import FieldDoesNotExist
from django.db import models

from .access_keys import shown_key_name
from .forms import SECRET_FIELDS
from .models import Destination

# The text shown in place of a stored secret.
SECRET_SET = "(set, hidden)"  # noqa: S105 (a marker, not a password)
EMPTY = "(empty)"
# A plain column, but a key pasted into SharedAccessKeyName ended up in it before
# validation rejected that.
KEY_NAME_FIELD = "servicebus_key_name"
# Columns that only record when a row was written, not what staff configured.
UNAUDITED_FIELDS = frozenset({"id", "created_at", "updated_at"})


def is_secret_lookup(lookup: str) -> bool:
    """Return whether a query lookup such as
    `servicebus_connection_string__startswith` reaches a secret column of a
    destination, directly or through a relation."""
    parts = lookup.split("__")
    return any(part in SECRET_FIELDS for part in parts)


def audited_fields() -> list[models.Field[Any, Any]]:
    """Return the destination columns whose changes the history records."""
    return [
        field
        for field in Destination._meta.concrete_fields
        if field.name not in UNAUDITED_FIELDS
    ]


def format_value(field: models.Field[Any, Any], value: Any) -> str:
    """Return one column's stored value as text for people, with no secret."""
    if field.name in SECRET_FIELDS:
        return SECRET_SET if value else EMPTY
    if field.name == KEY_NAME_FIELD and isinstance(value, str):
        return shown_key_name(value) if value else EMPTY
    if value is None or value == "":
        return EMPTY
    if field.choices:
        return str(dict(field.flatchoices).get(value, value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S} UTC"
    return str(value)


def raw_value(destination: Destination, field: models.Field[Any, Any]) -> Any:
    """Return the stored value, the primary key for a foreign key."""
    return getattr(destination, field.attname)


def masked_value(destination: Destination, field_name: str) -> str:
    """Return `destination`'s value of `field_name` as text, a secret masked.

    A foreign key shows the related object's name. Raise FieldDoesNotExist for a
    name that is not a column of Destination.
    """
    field = Destination._meta.get_field(field_name)
    if not isinstance(field, models.Field):
        raise FieldDoesNotExist(
            f"Destination.{field_name} is a reverse relation, not a column. Name "
            "one of the fields of Destination."
        )
    if field.is_relation:
        related = getattr(destination, field.name)
        return str(related) if related is not None else EMPTY
    return format_value(field, getattr(destination, field.attname))


def masked_summary(destination: Destination) -> dict[str, str]:
    """Return every audited column of `destination` by field name, as text with
    each secret masked."""
    return {
        field.name: masked_value(destination, field.name) for field in audited_fields()
    }
