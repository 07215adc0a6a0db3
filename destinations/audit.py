"""The change history of destinations: who changed what, from which value to which.

Django's admin already writes a LogEntry (user, time, changed field names) for each
add, change and delete. The mixin here adds an "audit" part to the entry's JSON
change message, which Django's own rendering ignores and the destination history
template shows:

    [{"changed": {"fields": ["queue URL"]}},
     {"audit": {"values": [{"field": "queue URL", "old": "...", "new": "..."}],
                "action": "Disable selected destinations"}}]

A secret column never has a value in it: a change shows as {"field": ...,
"secret": true}, a re-encryption as {"field": ..., "note": ...}.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from django.contrib.admin.models import CHANGE, LogEntry
from django.db import models
from django.http import HttpRequest

from .access_keys import shown_key_name
from .forms import SECRET_FIELDS
from .masking import audited_fields, format_value, raw_value
from .models import Destination

if TYPE_CHECKING:
    from django.contrib.admin import ModelAdmin

    _AdminBase = ModelAdmin[Destination]
else:
    _AdminBase = object

# Values longer than this are cut in the history, which is for reading, not restoring.
MAX_VALUE_LENGTH = 300
KEY_NAME_LABEL = str(Destination._meta.get_field("servicebus_key_name").verbose_name)
_SNAPSHOT = "_audit_snapshot"

Snapshot = dict[str, Any]
Change = dict[str, Any]


def snapshot(destination: Destination) -> Snapshot:
    """Return the stored value of every audited column of `destination`."""
    return {field.name: raw_value(destination, field) for field in audited_fields()}


def _shown(field: models.Field[Any, Any], value: Any) -> str:
    if field.is_relation and value is not None:
        related_model = field.related_model
        assert isinstance(related_model, type)
        related = related_model._base_manager.filter(pk=value).first()
        text = str(related) if related is not None else f"#{value}"
    else:
        text = format_value(field, value)
    if len(text) > MAX_VALUE_LENGTH:
        text = text[: MAX_VALUE_LENGTH - 1] + "…"
    return text


def diff(before: Snapshot | None, after: Snapshot) -> list[Change]:
    """Return one change per column whose value differs, secrets masked.

    With no `before` (a new destination), each column that differs from its
    default counts, with only its new value.
    """
    added = before is None
    if before is None:
        before = {field.name: field.get_default() for field in audited_fields()}

    changes = []
    for field in audited_fields():
        old, new = before.get(field.name), after.get(field.name)
        if old == new or (added and new in (None, "")):
            continue
        change: Change = {"field": str(field.verbose_name)}
        if field.name in SECRET_FIELDS:
            change["secret"] = True
        elif added:
            change["new"] = _shown(field, new)
        else:
            change["old"] = _shown(field, old)
            change["new"] = _shown(field, new)
        changes.append(change)
    return changes


def audit_message(changes: list[Change], action: str = "") -> list[dict[str, Any]]:
    """Return the LogEntry change message for a change made outside the form."""
    audit: dict[str, Any] = {"values": changes}
    if action:
        audit["action"] = action
    return [
        {"changed": {"fields": [change["field"] for change in changes]}},
        {"audit": audit},
    ]


def change_lines(entry: LogEntry) -> list[str]:
    """Return one line of text per changed column recorded in `entry`."""
    try:
        message = json.loads(entry.change_message or "[]")
    except json.JSONDecodeError:
        return []
    if not isinstance(message, list):
        return []

    lines = []
    for part in message:
        audit = part.get("audit") if isinstance(part, dict) else None
        if not isinstance(audit, dict):
            continue
        if audit.get("action"):
            lines.append(f"By the bulk action “{audit['action']}”.")
        for change in audit.get("values", []):
            lines.append(_change_line(change))
    return lines


def _change_line(change: Change) -> str:
    field = change.get("field", "?")
    if change.get("secret"):
        return f"{field}: changed"
    if field == KEY_NAME_LABEL:
        # Entries written before key-like key names were masked contain them as text.
        change = {
            name: shown_key_name(value) if isinstance(value, str) else value
            for name, value in change.items()
        }
    if "note" in change:
        return f"{field}: {change['note']}"
    if "old" not in change:
        return f"{field}: {change.get('new', '')}"
    return f"{field}: {change['old']} → {change.get('new', '')}"


class AuditMixin(_AdminBase):
    """Records old and new values in the change history of a destination."""

    object_history_template = "admin/destinations/destination/object_history.html"

    def get_object(
        self, request: HttpRequest, object_id: str, from_field: str | None = None
    ) -> Destination | None:
        destination = super().get_object(request, object_id, from_field)
        if destination is not None:
            # The form writes the submitted values into this same instance, so the
            # values before the change are kept aside now.
            setattr(destination, _SNAPSHOT, snapshot(destination))
        return destination

    def construct_change_message(
        self,
        request: HttpRequest,
        form: Any,
        formsets: Any,
        add: bool = False,
    ) -> Any:
        message: list[dict[str, Any]] = super().construct_change_message(
            request, form, formsets, add
        )
        before = None if add else getattr(form.instance, _SNAPSHOT, None)
        if not add and before is None:
            return message

        changes = diff(before, snapshot(form.instance))
        # Django names the fields the form saw as changed; the diff also covers
        # columns derived on save (region, namespace) and leaves out unchanged ones.
        message = [part for part in message if not _is_object_change(part)]
        if not add and changes:
            fields = [change["field"] for change in changes]
            message.insert(0, {"changed": {"fields": fields}})
        if changes:
            message.append({"audit": {"values": changes}})
        return message

    @contextmanager
    def recording_changes(
        self, request: HttpRequest, destination: Destination, action: str
    ) -> Iterator[None]:
        """Log what the block changes in `destination` as a change by `action`."""
        before = snapshot(destination)
        yield
        destination.refresh_from_db()
        changes = diff(before, snapshot(destination))
        if changes:
            self.log_change(request, destination, audit_message(changes, action))


def _is_object_change(part: Any) -> bool:
    return (
        isinstance(part, dict) and "changed" in part and "name" not in part["changed"]
    )


def log_rotation(user_id: Any, pks: list[Any], action: str) -> None:
    """Record that the connection strings of destinations `pks` were re-encrypted."""
    if not pks:
        return
    label = str(
        Destination._meta.get_field("servicebus_connection_string").verbose_name
    )
    change = {"field": label, "note": "re-encrypted with the current key"}
    LogEntry.objects.log_actions(
        user_id=user_id,
        queryset=Destination.objects.filter(pk__in=pks).select_related("application"),
        action_flag=CHANGE,
        change_message=audit_message([change], action),
    )
