"""ULIDs: 128-bit ids that sort by creation time, in the platform's lower-case form.

A ULID is a 48-bit Unix time in milliseconds followed by 80 random bits, written as
26 characters of Crockford's base32, as the ULID specification defines it.
"""

import secrets
import time

# Crockford's base32 leaves out i, l, o and u so that ids read aloud are unambiguous.
ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
LENGTH = 26
MAX_TIMESTAMP_MS = 2**48 - 1


def new_ulid(timestamp_ms: int | None = None) -> str:
    """Generate a ULID for `timestamp_ms` (default: now)."""
    if timestamp_ms is None:
        timestamp_ms = time.time_ns() // 1_000_000
    if not 0 <= timestamp_ms <= MAX_TIMESTAMP_MS:
        raise ValueError(
            f"timestamp_ms {timestamp_ms} is outside a ULID's range: it must be "
            f"between 0 and {MAX_TIMESTAMP_MS} milliseconds since 1970."
        )

    value = (timestamp_ms << 80) | secrets.randbits(80)
    characters = []
    for _ in range(LENGTH):
        characters.append(ALPHABET[value & 0b11111])
        value >>= 5
    return "".join(reversed(characters))


def ulid_timestamp_ms(ulid: str) -> int:
    """Return the millisecond time stored in the first ten characters of `ulid`."""
    value = 0
    for character in ulid[:10].lower():
        value = value * 32 + ALPHABET.index(character)
    return value
