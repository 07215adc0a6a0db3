"""Template filters for the destination change history."""

from django import template
from django.contrib.admin.models import LogEntry

from destinations.audit import change_lines

register = template.Library()


@register.filter
def audit_lines(entry: LogEntry) -> list[str]:
    """Return the old → new lines recorded in a destination's LogEntry."""
    return change_lines(entry)
