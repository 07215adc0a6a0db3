"""Shared access policies and the check of a shared access signature (SAS) token.

A token reads `SharedAccessSignature sr=RESOURCE&sig=SIGNATURE&se=EXPIRY&skn=KEYNAME`.
Service Bus accepts it when `sig` is the base64 HMAC-SHA256, keyed with the UTF-8
bytes of the policy's key, of `quote_plus(sr) + "\\n" + se`; when `se` (seconds since
1970) is in the future; and when `sr` covers the entity being accessed. This is how
azure-servicebus 7.15 signs its tokens (`_pyamqp/utils.py`, `generate_sas_token`).
"""

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote_plus, urlsplit

TOKEN_PREFIX = "SharedAccessSignature "  # noqa: S105 - a fixed word, not a secret
# The rights ("claims") a Service Bus shared access policy can grant. A policy with
# Manage always has Send and Listen as well.
ALL_RIGHTS = frozenset({"Manage", "Send", "Listen"})


@dataclass(frozen=True)
class SharedAccessPolicy:
    """A named key and the rights it grants; its repr hides the key."""

    name: str
    key: str = field(repr=False)
    rights: frozenset[str] = ALL_RIGHTS


@dataclass(frozen=True)
class VerifiedToken:
    key_name: str
    # The entity path the token's resource (sr) names; "" for the whole namespace.
    resource_path: str
    expires_at: int
    rights: frozenset[str]


class TokenRejected(Exception):
    """A rejected put-token request, which gets a 401 response as on Service Bus."""

    def __init__(self, description: str, key_name: str | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.key_name = key_name


def entity_path(address: str) -> str:
    """Return the entity path of an address such as amqps://HOST:PORT/orders, in
    lowercase because Service Bus entity names are case-insensitive."""
    if "://" in address:
        address = urlsplit(address).path
    return address.strip("/").lower()


def sign(resource: str, key: str, expiry: int) -> str:
    """Return the signature of `resource` and `expiry` keyed with `key`."""
    text = f"{quote_plus(resource)}\n{expiry}"
    digest = hmac.new(key.encode(), text.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def make_token(resource: str, policy: SharedAccessPolicy, lifetime: int = 3600) -> str:
    """Build a token for `resource` signed with `policy`, for tests and tools."""
    expiry = int(time.time()) + lifetime
    signature = sign(resource, policy.key, expiry)
    return (
        f"{TOKEN_PREFIX}sr={quote_plus(resource)}&sig={quote_plus(signature)}"
        f"&se={expiry}&skn={quote_plus(policy.name)}"
    )


def verify_token(
    token: str,
    audience: str,
    policies: dict[str, SharedAccessPolicy],
    now: float | None = None,
) -> VerifiedToken:
    """Check `token` for `audience` against `policies`; raise TokenRejected.

    The descriptions of the rejections never contain the signature or a key.
    """
    if not token.startswith(TOKEN_PREFIX):
        raise TokenRejected("The token is not a shared access signature.")
    fields = dict(parse_qsl(token.removeprefix(TOKEN_PREFIX), keep_blank_values=True))
    missing = [name for name in ("sr", "sig", "se", "skn") if not fields.get(name)]
    if missing:
        raise TokenRejected(
            f"The shared access signature lacks the field(s) {', '.join(missing)}."
        )

    key_name = fields["skn"]
    policy = policies.get(key_name)
    if policy is None:
        raise TokenRejected(
            f"InvalidSignature: no shared access policy is named {key_name!r}.",
            key_name,
        )

    expected = sign(fields["sr"], policy.key, _expiry(fields["se"], key_name))
    if not hmac.compare_digest(expected.encode(), fields["sig"].encode()):
        raise TokenRejected(
            "InvalidSignature: the token has an invalid signature.", key_name
        )

    expiry = int(fields["se"])
    if expiry <= (time.time() if now is None else now):
        raise TokenRejected(f"ExpiredToken: the token expired at {expiry}.", key_name)

    resource_path = entity_path(fields["sr"])
    audience_path = entity_path(audience)
    if resource_path and not (
        audience_path == resource_path or audience_path.startswith(resource_path + "/")
    ):
        raise TokenRejected(
            f"InvalidAudience: the token's resource {resource_path!r} does not cover "
            f"{audience_path!r}.",
            key_name,
        )
    return VerifiedToken(
        key_name=key_name,
        resource_path=resource_path,
        expires_at=expiry,
        rights=policy.rights,
    )


def _expiry(value: str, key_name: str) -> int:
    if not value.isdigit():
        raise TokenRejected(
            "The token's expiry (se) is not a number of seconds since 1970.", key_name
        )
    return int(value)
