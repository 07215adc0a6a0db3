"""Encryption at rest for destination secrets, with cryptography's MultiFernet.

The keys come from settings.ENCRYPTION_KEYS: the first one encrypts and every one
decrypts, which lets an operator add a new key in front, re-encrypt with
`manage.py rotate_secrets`, and only then drop the old key.
"""

from functools import cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.db import models

__all__ = [
    "EncryptedTextField",
    "EncryptionKeyError",
    "InvalidToken",
    "decrypt",
    "encrypt",
    "rotate",
]


class EncryptionKeyError(Exception):
    """ENCRYPTION_KEYS is empty or contains a value that is not a Fernet key."""


def parse_keys(values: list[str]) -> list[Fernet]:
    """Build one Fernet per configured key, naming the position of a bad one."""
    if not values:
        raise EncryptionKeyError(
            'ENCRYPTION_KEYS is empty. Generate a key with `python -c "from '
            'cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"`'
            " and set ENCRYPTION_KEYS to it."
        )

    fernets = []
    for position, value in enumerate(values, start=1):
        try:
            fernets.append(Fernet(value.strip().encode()))
        except ValueError as error:
            # The value itself is a secret: name its position, never its text.
            raise EncryptionKeyError(
                f"ENCRYPTION_KEYS entry {position} is not a Fernet key: "
                f"{str(error).rstrip('.')}. Each entry must be 32 bytes in URL-safe "
                "base64, 44 characters long."
            ) from error
    return fernets


@cache
def _multi_fernet(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet(parse_keys(list(keys)))


def current() -> MultiFernet:
    return _multi_fernet(tuple(settings.ENCRYPTION_KEYS))


def encrypt(plaintext: str) -> str:
    return current().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    """Return the plaintext of `token`; raise InvalidToken if no key opens it."""
    return current().decrypt(token.encode()).decode()


def rotate(token: str) -> str:
    """Re-encrypt `token` with the first key; raise InvalidToken if no key opens it."""
    return current().rotate(token.encode()).decode()


class EncryptedTextField(models.TextField):
    """A text column that contains a Fernet token, never the plaintext.

    The model keeps the token as loaded: nothing is decrypted until a caller asks with
    `decrypt()`, so listing rows works even when a key is missing. `rotate_secrets`
    finds every field of this class across all models.
    """

    def formfield(self, **kwargs: Any) -> None:
        # Admin forms get a write-only field of their own; the token is never a form
        # value.
        return None
