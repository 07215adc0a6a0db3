"""Text in event data that destinations and pages cannot carry, and JSON for pages.

JSON can escape a surrogate code point (U+D800 to U+DFFF) without its pair, such
as "\\ud800", and Python decodes it to a one-character string. UTF-8 has no
encoding for such a lone surrogate, so neither a destination nor a page can send
it, and PostgreSQL's jsonb rejects it. SQLite stores the JSON escaped, so events
recorded before parse_envelope checked for it may still contain one. NUL is valid
UTF-8, but PostgreSQL rejects it in text and jsonb.
"""

import json
import re
from collections.abc import Iterator
from typing import Any

SURROGATE_RE = re.compile("[\ud800-\udfff]")


def has_invalid_text(text: str) -> bool:
    """Return whether `text` contains a NUL character or a lone surrogate."""
    return "\x00" in text or SURROGATE_RE.search(text) is not None


def invalid_text(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Yield (path, text) for each key and string in the JSON value `value` that
    contains a NUL character or a lone surrogate, such as ("data.items[0]",
    "\\ud800"). A rejected key is reported as "a key of PATH" and its value is
    skipped, so every path yielded is free of such text."""
    if isinstance(value, str):
        if has_invalid_text(value):
            yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and has_invalid_text(key):
                yield f"a key of {path or 'the envelope'}", key
                continue
            yield from invalid_text(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from invalid_text(item, f"{path}[{index}]")


def readable_json(value: Any, indent: int | None = None) -> str:
    """Return `value` as JSON text that keeps non-ASCII characters as they are,
    except lone surrogates, which stay \\uXXXX escapes so that the page encodes."""
    text = json.dumps(value, indent=indent, ensure_ascii=False)
    return SURROGATE_RE.sub(lambda match: f"\\u{ord(match[0]):04x}", text)
