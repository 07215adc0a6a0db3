"""Form error messages that name the field, the value where Django passes it, and
the fix, in place of Django's generic ones ("This field is required.", "Ensure this
value has at most 64 characters (it has 80).")."""

from collections.abc import Iterable
from typing import Any, cast

from django import forms

# Up to this many choices, an invalid choice's message lists them all.
LISTED_CHOICES = 10


class ExplainedErrors(forms.BaseForm):
    """A form whose fields explain their own errors.

    Django formats a field's message for a validator's code with the validator's
    parameters (the value, the limit, the length), so the messages below can
    quote them. A message a field or form sets itself is kept.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, field in self.fields.items():
            label = str(field.label or name.replace("_", " ").capitalize())
            for code, message in _messages(label, field).items():
                current = field.error_messages.get(code)
                # A validator's own code, such as max_length, has no field message.
                if current is None or str(current) == _default(field, code):
                    field.error_messages[code] = message


def _default(field: forms.Field, code: str) -> str | None:
    """Return Django's own message of `field`'s class for `code`."""
    messages: dict[str, str] = {}
    for cls in reversed(type(field).__mro__):
        messages.update(getattr(cls, "default_error_messages", {}))
    message = messages.get(code)
    return None if message is None else str(message)


def _messages(label: str, field: forms.Field) -> dict[str, str]:
    """Return the messages for `field`, labelled `label`, by error code."""
    messages = {"required": f"{label} is required. Enter a value."}
    if isinstance(field, forms.CharField):
        messages["max_length"] = (
            f"{label} is %(show_value)d characters long, over the limit of "
            "%(limit_value)d. Shorten it to %(limit_value)d characters or fewer."
        )
        messages["min_length"] = (
            f"{label} is %(show_value)d characters long, under the minimum of "
            "%(limit_value)d. Enter at least %(limit_value)d characters."
        )
    if isinstance(field, forms.ModelChoiceField):
        messages["invalid_choice"] = (
            f"{label}: no choice %(value)s exists, or it was deleted meanwhile. "
            "Choose one from the list."
        )
    elif isinstance(field, forms.ChoiceField):
        # Normalized by Django into (value, label) pairs, or (group, pairs) for a
        # group, whose members are left out here.
        choices = cast(Iterable[tuple[Any, Any]], field.choices)
        values = [
            str(value)
            for value, label in choices
            if value != "" and not isinstance(label, list | tuple)
        ]
        if values and len(values) <= LISTED_CHOICES:
            fix = f"Choose one of: {', '.join(values)}."
        else:
            fix = "Choose one from the list."
        messages["invalid_choice"] = f"{label}: %(value)s is not a choice. {fix}"
    if isinstance(field, forms.IntegerField):
        messages["invalid"] = f"{label} must be a whole number, such as 30."
        messages["min_value"] = (
            f"{label} must be %(limit_value)s or more. Enter a larger number."
        )
        messages["max_value"] = (
            f"{label} must be %(limit_value)s or less. Enter a smaller number."
        )
    return messages
