"""Validation of each destination kind's configuration, one module per kind."""

from ..models import Destination


def validate_destination(destination: Destination) -> None:
    """Check and normalise `destination`; raise ValidationError keyed by field."""
