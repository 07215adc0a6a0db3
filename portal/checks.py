"""System checks that stop start-up when the deployment cannot work safely."""

from typing import Any

from django.conf import settings
from django.core.checks import Error, register

from destinations import encryption


@register()
def check_encryption_keys(app_configs: Any, **kwargs: Any) -> list[Error]:
    """destinations.E001: no key configured; destinations.E002: a malformed key."""
    if not settings.ENCRYPTION_KEYS:
        return [
            Error(
                "ENCRYPTION_KEYS is not set, so secrets cannot be stored or read.",
                hint=(
                    'Generate a key with `python -c "from cryptography.fernet import '
                    'Fernet; print(Fernet.generate_key().decode())"` and set '
                    "ENCRYPTION_KEYS to it (comma separated when rotating)."
                ),
                id="destinations.E001",
            )
        ]

    try:
        encryption.parse_keys(settings.ENCRYPTION_KEYS)
    except encryption.EncryptionKeyError as error:
        return [Error(str(error), id="destinations.E002")]
    return []
