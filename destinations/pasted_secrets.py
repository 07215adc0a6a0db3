"""Recognising a secret pasted into a plain field, so that it is never shown back.

Staff paste credentials into the wrong field: a Service Bus connection string into a
queue URL, a service account key file into a topic ID. Validation messages quote the
value they reject, and the admin re-fills a rejected input, so each message about
such text names what was pasted instead, and the form leaves the input blank.
"""

import re

from django.core.exceptions import ValidationError

from .access_keys import KEY_RE

# The code of the error raised for a secret in a plain field.
SECRET_PASTED = "secret_pasted"  # noqa: S105 (an error code, not a password)

CONNECTION_KEY_RE = re.compile(r"SharedAccessKey\s*=", re.IGNORECASE)
SIGNATURE_RE = re.compile(r"SharedAccessSignature", re.IGNORECASE)
PEM_RE = re.compile(r"-----BEGIN [A-Z0-9 ]*-----")
# A service account key file is JSON with "private_key" and "private_key_id".
SERVICE_ACCOUNT_RE = re.compile(r"[\"']private_key", re.IGNORECASE)
AWS_SECRET_LABEL_RE = re.compile(r"aws_secret_access_key", re.IGNORECASE)
# Lookaheads for at least one lower case letter, one upper case letter and one digit.
MIXED = r"(?=[^a-z]*[a-z])(?=[^A-Z]*[A-Z])(?=[^0-9]*[0-9])"
MIXED_RE = re.compile(MIXED)
# An AWS secret access key is 40 base64 characters. Names of that length are common,
# so only a whole value mixing upper case, lower case and digits counts.
AWS_SECRET_KEY_RE = re.compile(rf"{MIXED}[A-Za-z0-9+/]{{40}}")


def describe_secret(text: str) -> str | None:
    """Return what kind of secret `text` seems to contain, as a noun phrase for a
    message, or None when it seems to contain none."""
    if CONNECTION_KEY_RE.search(text):
        return "a Service Bus connection string with its key"
    if SIGNATURE_RE.search(text):
        return "a Service Bus shared access signature"
    if SERVICE_ACCOUNT_RE.search(text):
        return "a Google Cloud service account key"
    if PEM_RE.search(text):
        return "a PEM private key or certificate"
    if AWS_SECRET_LABEL_RE.search(text) or AWS_SECRET_KEY_RE.fullmatch(text.strip()):
        return "an AWS secret access key"
    if any(is_key_run(match, text) for match in KEY_RE.finditer(text)):
        return "a key (43 or more base64 characters in a row)"
    return None


def is_key_run(match: re.Match[str], text: str) -> bool:
    """Return whether a run of 43 or more base64 characters is likely a key.

    A run with '=' padding after it or a '+' in it is a key. So is a run without
    '/' that mixes upper case, lower case and digits. A run with '/' and neither of
    those is taken for a path, such as /123456789012/queue-name in a queue URL.
    """
    # NOTE: an unpadded key that has '/' but no '+' is missed by this rule, about
    # one key in four, because paths such as queue URLs look the same.
    run = match.group()
    if text[match.end() : match.end() + 1] == "=" or "+" in run:
        return True
    return "/" not in run and MIXED_RE.match(run) is not None


def secret_error(label: str, description: str, fix: str) -> ValidationError:
    """Return the error for a field whose value looks like a secret, naming what
    was pasted without quoting it."""
    return ValidationError(
        f"{label} contains what looks like {description}, so it is not shown. {fix}",
        code=SECRET_PASTED,
    )


def check_not_secret(label: str, text: str, fix: str) -> ValidationError | None:
    """Return a `secret_error` when `text` looks like a secret, otherwise None."""
    description = describe_secret(text)
    if description is None:
        return None
    return secret_error(label, description, fix)
