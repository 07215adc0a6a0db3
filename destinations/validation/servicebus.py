"""Validation of a Service Bus destination and parsing of its connection string.

`parse_connection_string` is public so that a transport can reuse it. Its messages
name the pair that is wrong but never contain a SharedAccessKey or
SharedAccessSignature value, nor the whole string, because they are shown in the
admin and may be logged.
"""

import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl

from django.core.exceptions import ValidationError

from ..access_keys import looks_like_key
from ..models import Destination

CLOUD_SUFFIXES = (
    "servicebus.windows.net",
    # The sovereign clouds: Azure China, Azure Government, Azure Germany.
    "servicebus.chinacloudapi.cn",
    "servicebus.usgovcloudapi.net",
    "servicebus.cloudapi.de",
)
EMULATOR_HOSTS = ("127.0.0.1", "localhost")

# The keys a connection string may hold, by their lowercase form: keys are
# case-insensitive, as in azure-servicebus 7.x's own parser.
KEYS = {
    key.lower(): key
    for key in (
        "Endpoint",
        "SharedAccessKeyName",
        "SharedAccessKey",
        "SharedAccessSignature",
        "EntityPath",
        "UseDevelopmentEmulator",
    )
}
# Values that may be quoted in an error message. Any other pair's value, known or
# not, is treated as a secret.
PUBLIC_KEYS = (
    "Endpoint",
    "SharedAccessKeyName",
    "EntityPath",
    "UseDevelopmentEmulator",
)

# A pair's key is quoted only when it is short and made of letters and spaces, so
# that a stray key or signature is never quoted as a key.
KEY_SHOWN_RE = re.compile(r"\s*[A-Za-z][A-Za-z\s]{0,39}")
NAMESPACE_CHARACTERS_RE = re.compile(r"[A-Za-z0-9-]+")
# Service Bus rejects any other character with 400, SubCode 40000: "Entity segments
# can contain only letters, numbers, periods (.), hyphens (-), and underscores (_)",
# and '/' separates segments. ASCII only, because str.isalnum() accepts other scripts.
ENTITY_CHARACTERS_RE = re.compile(r"[A-Za-z0-9._/-]*")
MAX_ENTITY_LENGTH = 260
MAX_KEY_NAME_LENGTH = 256
# The Premium tier's largest entity setting. The Standard tier allows 256 KB.
MAX_MESSAGE_SIZE = 100 * 1024 * 1024
# Below this, not even an event's envelope fits.
MIN_MESSAGE_SIZE = 1024
# Far above any real connection string (an Endpoint, a policy name of at most 256
# characters, a key or signature and an entity path of at most 260), and checked
# before parsing, whose time grows with the number of pairs.
MAX_CONNECTION_STRING_LENGTH = 4096
# The last second that Python's datetime can hold, 9999-12-31 23:59:59 UTC.
MAX_EXPIRY = 253402300799

PORTAL_HINT = (
    "Copy the primary connection string of a shared access policy with the Send "
    "claim, from the Shared access policies page of the namespace, queue or topic"
)
# Per field, the value to enter instead of a secret pasted there by mistake.
PASTE_HINTS = {
    "servicebus_entity_name": (
        "Enter the name of the queue or topic, such as orders. The connection string "
        "and its key go into the Connection string field."
    ),
}

# The azure-servicebus 7.x client's behaviour unless UseDevelopmentEmulator=true is
# spelt exactly so.
WITHOUT_EMULATOR_FLAG = "drops the port and connects with TLS on port 5671"

Errors = list[ValidationError]


@dataclass(frozen=True)
class ConnectionString:
    """A parsed Service Bus connection string, whose repr hides the secrets."""

    # The Endpoint as sb://HOST[:PORT]/ with the host in lowercase.
    endpoint: str
    host: str
    port: int | None
    # The first label of a cloud host, or the whole host for the development emulator.
    namespace: str
    # SharedAccessKeyName, or the skn of a SharedAccessSignature.
    key_name: str | None
    key: str | None = field(repr=False)
    shared_access_signature: str | None = field(repr=False)
    entity_path: str | None
    use_development_emulator: bool

    @property
    def address(self) -> str:
        """The host, with the port when one is given."""
        return self.host if self.port is None else f"{self.host}:{self.port}"


def parse_connection_string(text: str) -> ConnectionString:
    """Parse and check a connection string.

    Raise ValidationError listing every problem found, in messages that never
    contain a secret.
    """
    if len(text) > MAX_CONNECTION_STRING_LENGTH:
        raise ValidationError(
            f"The connection string is {len(text)} characters long, but at most "
            f"{MAX_CONNECTION_STRING_LENGTH} are accepted. Paste the connection "
            f"string alone. {PORTAL_HINT}.",
            code="too_long",
        )
    parser = _Parser(text)
    return parser.parse()


def is_number(text: str) -> bool:
    """Return whether `text` is ASCII digits only. str.isdigit() alone also
    accepts digits such as '²' that int() rejects, and other scripts' digits."""
    return text.isascii() and text.isdigit()


class _Parser:
    def __init__(self, text: str) -> None:
        self.errors: Errors = []
        self.secrets: list[str] = []
        self.values: dict[str, str] = {}
        # Keys whose pair is already reported as malformed, so that their absence
        # from `values` is not reported again as a missing key.
        self.reported: set[str] = set()
        self.pairs = self.split_pairs(text)

    def parse(self) -> ConnectionString:
        self.read_pairs()

        emulator = self.read_emulator_flag()
        endpoint = self.read_endpoint(emulator)
        key_name, key, signature = self.read_credentials()
        entity_path = self.read_entity_path()

        if self.errors or endpoint is None:
            raise ValidationError(self.errors)

        host, port, namespace = endpoint
        netloc = host if port is None else f"{host}:{port}"
        return ConnectionString(
            endpoint=f"sb://{netloc}/",
            host=host,
            port=port,
            namespace=namespace,
            key_name=key_name,
            key=key,
            shared_access_signature=signature,
            entity_path=entity_path,
            use_development_emulator=bool(emulator),
        )

    def fail(self, message: str, code: str) -> None:
        self.errors.append(ValidationError(message, code=code))

    def contains_secret(self, text: str) -> bool:
        # Case-insensitive and without base64 padding, because a host is lowercased
        # and a pasted key may have lost its trailing '='.
        folded = text.lower()
        return any(
            secret.strip().rstrip("=").lower() in folded
            for secret in self.secrets
            if secret.strip().rstrip("=")
        )

    def shown(self, value: str) -> str:
        """Quote `value` for a message, unless it may contain a secret."""
        if "=" in value or self.contains_secret(value) or looks_like_key(value):
            return "(not shown, because it seems to contain a key)"
        return repr(value)

    def shown_pair(self, key: str, position: int) -> str:
        """Name a pair by its key, or by its position if the key may be a secret."""
        if KEY_SHOWN_RE.fullmatch(key) and not self.contains_secret(key):
            return f"The pair {key!r}"
        return f"Pair {position}"

    @staticmethod
    def split_pairs(text: str) -> list[tuple[str, str | None]]:
        """Split into (key, value) pairs; a pair without '=' has the value None."""
        body = text.strip()
        # One trailing ';' is common, and the Azure SDK accepts it.
        body = body.removesuffix(";")
        if not body:
            return []

        pairs: list[tuple[str, str | None]] = []
        for pair in body.split(";"):
            key, separator, value = pair.partition("=")
            pairs.append((key, value if separator else None))
        return pairs

    def read_pairs(self) -> None:
        # Collect the secrets first, so that no later message can quote one.
        for key, value in self.pairs:
            if value and KEYS.get(key.lower()) not in PUBLIC_KEYS:
                self.secrets.append(value)

        if not self.pairs:
            self.fail(f"The connection string is empty. {PORTAL_HINT}.", "missing")

        for position, (key, value) in enumerate(self.pairs, start=1):
            self.read_pair(position, key, value)

    def read_pair(self, position: int, key: str, value: str | None) -> None:
        pair = self.shown_pair(key, position)
        canonical = KEYS.get(key.lower())
        meant = KEYS.get("".join(key.split()).lower())
        if meant is not None and (value is None or canonical is None):
            self.reported.add(meant)

        if not key.strip() and value is None:
            self.fail(
                f"Pair {position} is empty: remove the extra ';'. Pairs are "
                "separated by one ';', as in Endpoint=...;SharedAccessKeyName=....",
                "empty_pair",
            )
        elif value is None:
            self.fail(
                f"{pair} has no '='. Each pair is written Key=value, "
                f"and pairs are separated by ';'. {PORTAL_HINT}.",
                "pair_without_value",
            )
        elif any(character.isspace() for character in key):
            self.fail(
                f"{pair} has a space in its key. Keys are written "
                "without spaces, such as SharedAccessKeyName.",
                "space_in_key",
            )
        elif not key:
            self.fail(f"{pair} has no key before its '='.", "pair_without_key")
        elif canonical is None:
            self.fail(
                f"{pair} is not a Service Bus connection string key. "
                f"The keys are {', '.join(KEYS.values())}.",
                "unknown_key",
            )
        elif canonical in self.values:
            self.fail(f"{canonical} appears more than once: keep one.", "duplicate_key")
        elif value != value.strip():
            self.reported.add(canonical)
            self.fail(
                f"The value of {canonical} starts or ends with a space. Remove it: the "
                "Service Bus client would use the space as part of the value.",
                "space_in_value",
            )
        else:
            self.values[canonical] = value

    def read_emulator_flag(self) -> bool | None:
        """Return the UseDevelopmentEmulator flag, or None if it is unknown."""
        value = self.values.get("UseDevelopmentEmulator")
        if "UseDevelopmentEmulator" in self.reported:
            return None
        if value is None or value == "false":
            return False
        if value == "true":
            return True
        if value.lower() == "true":
            self.fail(
                f"UseDevelopmentEmulator={value} must be written "
                "UseDevelopmentEmulator=true, because the Service Bus client accepts "
                f"only lowercase true, and otherwise {WITHOUT_EMULATOR_FLAG}.",
                "emulator_flag_case",
            )
            # Go on as the user meant, so the host is not reported as well.
            return True
        self.fail(
            f"UseDevelopmentEmulator must be true or false, not {self.shown(value)}.",
            "invalid_emulator_flag",
        )
        return False

    def read_endpoint(
        self, emulator: bool | None
    ) -> tuple[str, int | None, str] | None:
        """Return host, port and namespace of the Endpoint, or None if invalid."""
        value = self.values.get("Endpoint")
        if value is None and "Endpoint" in self.reported:
            return None
        if not value:
            self.fail(
                "The Endpoint pair is missing or empty. It names the namespace as "
                f"Endpoint=sb://NAMESPACE.servicebus.windows.net/. {PORTAL_HINT}.",
                "missing_endpoint",
            )
            return None

        if value[:5].lower() != "sb://":
            self.fail(
                f"Endpoint {self.shown(value)} must start with sb://. Paste the "
                "whole connection string of a shared access policy, whose Endpoint "
                "is sb://NAMESPACE.servicebus.windows.net/, not the namespace's URL "
                "or host name.",
                "endpoint_without_sb",
            )
            return None

        address = value[5:].removesuffix("/")
        if not address or "/" in address:
            self.fail(
                f"Endpoint {self.shown(value)} must name the namespace only, as "
                "sb://NAMESPACE.servicebus.windows.net/. The queue or topic goes into "
                "the entity name.",
                "invalid_endpoint",
            )
            return None

        host, _, port_text = address.lower().partition(":")
        port = self.read_port(value, port_text)
        if host in EMULATOR_HOSTS:
            return self.check_emulator_host(host, port, emulator)
        return self.check_cloud_host(host, port, emulator)

    def read_port(self, endpoint: str, port_text: str) -> int | None:
        if not port_text:
            return None
        if is_number(port_text) and len(port_text) <= 5 and 0 < int(port_text) < 65536:
            return int(port_text)
        self.fail(
            f"Endpoint {self.shown(endpoint)} has an invalid port: write it as "
            "sb://HOST:PORT with a port from 1 to 65535.",
            "invalid_port",
        )
        return None

    def check_emulator_host(
        self, host: str, port: int | None, emulator: bool | None
    ) -> tuple[str, int | None, str] | None:
        if emulator is False:
            self.fail(
                f"Endpoint host {host!r} is a local address, which needs "
                "UseDevelopmentEmulator=true in the connection string: without it the "
                f"Service Bus client {WITHOUT_EMULATOR_FLAG}.",
                "local_host_without_emulator_flag",
            )
            return None
        return host, port, host

    def check_cloud_host(
        self, host: str, port: int | None, emulator: bool | None
    ) -> tuple[str, int | None, str] | None:
        if emulator:
            self.fail(
                f"UseDevelopmentEmulator=true is only for a local emulator at "
                f"127.0.0.1 or localhost, not {self.shown(host)}. Remove it.",
                "emulator_flag_on_cloud_host",
            )
            return None

        suffix = next((s for s in CLOUD_SUFFIXES if host.endswith(f".{s}")), None)
        if suffix is None:
            self.fail(
                f"Endpoint host {self.shown(host)} is not a Service Bus namespace. "
                "Expected NAMESPACE.servicebus.windows.net, or in the sovereign "
                f"clouds NAMESPACE.{', NAMESPACE.'.join(CLOUD_SUFFIXES[1:])}.",
                "invalid_endpoint_host",
            )
            return None

        if port is not None:
            self.fail(
                f"Endpoint host {self.shown(host)} has a port ({port}). The Service "
                "Bus client ignores a port unless UseDevelopmentEmulator=true, and "
                "connects to Azure on its standard port. Remove the port.",
                "port_on_cloud_host",
            )

        namespace = host.removesuffix(f".{suffix}")
        problems = namespace_problems(namespace)
        for problem in problems:
            self.fail(
                f"Namespace {self.shown(namespace)} in the Endpoint is not valid. "
                f"{problem}",
                "invalid_namespace",
            )
        if problems or port is not None:
            return None
        return host, port, namespace

    def read_credentials(self) -> tuple[str | None, str | None, str | None]:
        """Return the key name, key and shared access signature."""
        key_name = self.values.get("SharedAccessKeyName")
        key = self.values.get("SharedAccessKey")
        signature = self.values.get("SharedAccessSignature")
        if self.reported & {
            "SharedAccessKeyName",
            "SharedAccessKey",
            "SharedAccessSignature",
        }:
            return None, None, None

        if key_name and looks_like_key(key_name):
            self.fail(
                "SharedAccessKeyName (not shown) looks like a key, because it has 43 "
                "or more base64 characters in a row, as a SharedAccessKey does. Put "
                "the name of the shared access policy, such as "
                "RootManageSharedAccessKey, in SharedAccessKeyName and its key in "
                "SharedAccessKey. A policy name that long needs a '-', '.' or '_' "
                f"among its letters and digits. {PORTAL_HINT}.",
                "key_in_key_name",
            )
        elif signature is not None and (key_name is not None or key is not None):
            self.fail(
                "The connection string has both SharedAccessSignature and "
                "SharedAccessKeyName/SharedAccessKey. Keep only one of the two ways "
                f"to sign in. {PORTAL_HINT}.",
                "two_credentials",
            )
        elif signature is not None:
            return self.read_signature(signature), None, signature
        elif key_name and not key:
            self.fail(
                f"SharedAccessKeyName {self.shown(key_name)} has no SharedAccessKey. "
                f"{PORTAL_HINT}.",
                "key_name_without_key",
            )
        elif key and not key_name:
            self.fail(
                "The SharedAccessKey has no SharedAccessKeyName naming its policy. "
                f"{PORTAL_HINT}.",
                "key_without_key_name",
            )
        elif not key_name or not key:
            self.fail(
                "The connection string has no credentials: it needs "
                "SharedAccessKeyName and SharedAccessKey, or SharedAccessSignature. "
                f"{PORTAL_HINT}.",
                "missing_credentials",
            )
        elif len(key_name) > MAX_KEY_NAME_LENGTH:
            self.fail(
                f"SharedAccessKeyName is {len(key_name)} characters long, but a "
                f"policy name has at most {MAX_KEY_NAME_LENGTH}. {PORTAL_HINT}.",
                "invalid_key_name",
            )
        else:
            return key_name, key, None
        return None, None, None

    def read_signature(self, signature: str) -> str | None:
        """Check a SharedAccessSignature token and return its key name (skn)."""
        prefix = "SharedAccessSignature "
        fields = dict(parse_qsl(signature.removeprefix(prefix)))
        if not signature.startswith(prefix) or not {"sr", "sig", "se"} <= set(fields):
            self.fail(
                "The SharedAccessSignature is not a shared access signature token, "
                "which looks like "
                "SharedAccessSignature sr=URI&sig=SIGNATURE&se=EXPIRY&skn=KEYNAME. "
                "Generate a new token, or use SharedAccessKeyName and SharedAccessKey.",
                "invalid_signature",
            )
            return None

        expiry = fields["se"]
        if not is_number(expiry):
            self.fail(
                "The SharedAccessSignature's expiry (se) is not a number of seconds "
                "since 1970. Generate a new token.",
                "invalid_signature",
            )
        elif len(expiry) > len(str(MAX_EXPIRY)) or int(expiry) > MAX_EXPIRY:
            shown = self.shown(expiry) if len(expiry) <= 40 else f"{len(expiry)} digits"
            self.fail(
                f"The SharedAccessSignature's expiry (se) {shown} is after the year "
                "9999, so it is not a time. Generate a new token.",
                "invalid_signature",
            )
        elif int(expiry) <= time.time():
            expired_at = datetime.fromtimestamp(int(expiry), UTC)
            self.fail(
                "The SharedAccessSignature expired at "
                f"{expired_at:%Y-%m-%d %H:%M:%S} UTC. Generate a new token, or use "
                "SharedAccessKeyName and SharedAccessKey, which do not expire.",
                "expired_signature",
            )
        key_name = fields.get("skn")
        if key_name and looks_like_key(key_name):
            self.fail(
                "The SharedAccessSignature's key name (skn, not shown) looks like a "
                "key, because it has 43 or more base64 characters in a row. Generate "
                "a new token whose skn is the name of the shared access policy.",
                "key_in_key_name",
            )
            return None
        return key_name

    def read_entity_path(self) -> str | None:
        path = self.values.get("EntityPath")
        if path is None or "EntityPath" in self.reported:
            return None
        if not path:
            self.fail(
                "EntityPath is empty: remove the pair, or give the queue or topic "
                "name.",
                "invalid_entity_path",
            )
            return None

        problems = entity_name_problems(path)
        for problem in problems:
            self.fail(
                f"EntityPath {self.shown(path)} is not valid. {problem}",
                "invalid_entity_path",
            )
        return None if problems else path


def namespace_problems(namespace: str) -> list[str]:
    """Return what breaks Azure's namespace naming rules, one sentence per rule."""
    problems = []
    if not 6 <= len(namespace) <= 50:
        problems.append(
            f"A namespace name has 6 to 50 characters, not {len(namespace)}."
        )
    if not NAMESPACE_CHARACTERS_RE.fullmatch(namespace):
        problems.append("A namespace name contains only letters, digits and hyphens.")
    if namespace and not (namespace[0].isascii() and namespace[0].isalpha()):
        problems.append("A namespace name starts with a letter.")
    if namespace and not (namespace[-1].isascii() and namespace[-1].isalnum()):
        problems.append("A namespace name ends with a letter or digit.")
    if namespace.lower().endswith(("-sb", "-mgmt")):
        problems.append("Azure reserves namespace names ending in -sb or -mgmt.")
    return problems


def entity_name_problems(name: str) -> list[str]:
    """Return what breaks Service Bus's entity naming rules, one sentence per rule."""
    problems = []
    if len(name) > MAX_ENTITY_LENGTH:
        problems.append(
            f"An entity name has at most {MAX_ENTITY_LENGTH} characters, not "
            f"{len(name)}."
        )
    if name.startswith("/") or name.endswith("/"):
        problems.append("An entity name must not start or end with '/'.")
    forbidden = sorted(set(ENTITY_CHARACTERS_RE.sub("", name)))
    if forbidden:
        listed = ", ".join(character_name(character) for character in forbidden)
        problems.append(
            f"An entity name must not contain these characters: {listed}. It may "
            "contain only letters, "
            "digits, periods, hyphens, underscores, and slashes between names."
        )
    return problems


def character_name(character: str) -> str:
    """Return `character` as a message shows it: invisible ones by code point."""
    if character == " ":
        return "space"
    if not character.isprintable() or character.isspace():
        return f"U+{ord(character):04X}"
    return character


def validate(destination: Destination) -> None:
    """Parse a new connection string into the plain columns and check the entity."""
    errors: dict[str, Errors] = defaultdict(list)
    destination.servicebus_entity_name = (
        destination.servicebus_entity_name or ""
    ).strip()

    new_text = destination._new_connection_string
    if new_text is not None and not new_text.strip():
        # An empty new value keeps the stored string, because save() would
        # otherwise encrypt the empty text over it.
        destination._new_connection_string = new_text = None

    # The EntityPath in force, or None when the connection string could not be
    # read and whether it names an entity is unknown.
    entity_path: str | None = ""
    if new_text is not None:
        try:
            parsed = parse_connection_string(new_text)
        except ValidationError as error:
            errors["servicebus_connection_string"].extend(error.error_list)
            entity_path = None
        else:
            destination.servicebus_namespace = parsed.address
            destination.servicebus_key_name = parsed.key_name or ""
            destination.servicebus_entity_path = parsed.entity_path or ""
            entity_path = destination.servicebus_entity_path
    elif destination.servicebus_connection_string:
        # The stored string is not decrypted here: its EntityPath was copied into
        # a plain column when it was saved.
        entity_path = destination.servicebus_entity_path
    else:
        errors["servicebus_connection_string"].append(
            ValidationError(
                f"Enter a connection string. {PORTAL_HINT}.", code="missing"
            )
        )

    errors["servicebus_entity_name"].extend(check_entity_name(destination, entity_path))

    size = destination.servicebus_max_message_size
    # None when the field itself failed to validate, which Django reports already.
    if size is not None and size < MIN_MESSAGE_SIZE:
        errors["servicebus_max_message_size"].append(
            ValidationError(
                f"Maximum message size {size} is smaller than {MIN_MESSAGE_SIZE} "
                "bytes, too small for any event. Enter the entity's own maximum "
                "message size: 262144 (256 KB) on the Standard tier.",
                code="invalid_max_message_size",
            )
        )
    if size is not None and size > MAX_MESSAGE_SIZE:
        errors["servicebus_max_message_size"].append(
            ValidationError(
                f"Maximum message size {size} is larger than Service Bus allows: "
                f"{MAX_MESSAGE_SIZE} bytes (100 MB) on the Premium tier, 262144 "
                "(256 KB) on Standard. Enter the entity's own maximum message size.",
                code="invalid_max_message_size",
            )
        )

    errors = {key: value for key, value in errors.items() if value}
    if errors:
        raise ValidationError(errors)


def check_entity_name(destination: Destination, entity_path: str | None) -> Errors:
    """Check the entity name, filling it from the EntityPath when it is blank."""
    name = destination.servicebus_entity_name
    if not name:
        if entity_path:
            destination.servicebus_entity_name = entity_path
        elif entity_path is not None:
            return [
                ValidationError(
                    "Enter the name of the queue or topic, or use a connection "
                    "string of the queue or topic itself, which ends in "
                    "EntityPath=NAME.",
                    code="missing",
                )
            ]
        return []

    problems = [
        ValidationError(f"Entity name {name!r} is not valid. {problem}", code="invalid")
        for problem in entity_name_problems(name)
    ]
    if entity_path and name != entity_path:
        problems.append(
            ValidationError(
                f"Entity name {name!r} differs from EntityPath {entity_path!r} in the "
                "connection string, which only grants access to that entity. Clear "
                f"the entity name to use {entity_path!r}, or use a connection string "
                f"of the namespace or of {name!r}.",
                code="entity_path_mismatch",
            )
        )
    return problems
