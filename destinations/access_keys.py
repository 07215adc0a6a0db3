"""Recognising a Service Bus shared access key in text that the portal shows.

A SharedAccessKey is "a base64-encoded 256-bit primary key" (Microsoft's ARM
template reference for Microsoft.ServiceBus/namespaces/topics/authorizationRules,
property primaryKey): 32 bytes, so 44 base64 characters, the last one '=' padding.
Validation rejects a key pasted into SharedAccessKeyName, which would otherwise be
stored in a plain column and shown as the key name in the admin, the status pages,
the history and error messages. Rows saved before that check still contain such a
key name, so every place that shows one masks it.
"""

import re

# 32 bytes take 43 base64 characters before the padding. A policy name with this
# many letters and digits in a row cannot be distinguished from a key that lost its
# padding, so validation rejects it too, and its message requests a '-', '.' or '_'.
KEY_RE = re.compile(r"[A-Za-z0-9+/]{43,}")
HIDDEN_KEY_NAME = "(not shown, because it looks like a key)"


def looks_like_key(text: str) -> bool:
    """Return whether `text` contains 43 or more base64 characters in a row, the
    length of a SharedAccessKey without its padding."""
    return KEY_RE.search(text) is not None


def shown_key_name(key_name: str) -> str:
    """Return `key_name` for display, or a marker when it looks like a key."""
    return HIDDEN_KEY_NAME if looks_like_key(key_name) else key_name
