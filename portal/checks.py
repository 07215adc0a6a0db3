"""System checks that stop start-up when the deployment cannot work safely."""

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from kombu import Connection

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


# Delivery engine settings that must be at least 1 (or 0 for the batch wait).
ENGINE_MINIMUMS = {
    "DELIVERY_CLAIM_SIZE": 1,
    "DELIVERY_RUN_SIZE": 1,
    "DELIVERY_LEASE_SECONDS": 1,
    "PUBSUB_BATCH_LATENCY": 0,
}


@register()
def check_engine_settings(app_configs: Any, **kwargs: Any) -> list[Error]:
    """delivery.E001: a delivery engine setting below its minimum, with which
    workers would send nothing or claim deliveries that expire at once."""
    errors = []
    for name, minimum in ENGINE_MINIMUMS.items():
        value = getattr(settings, name)
        if value < minimum:
            errors.append(
                Error(
                    f"{name} is {value}, but it must be at least {minimum}.",
                    hint=f"Set {name} to {minimum} or more, or unset it for the "
                    "default.",
                    id="delivery.E001",
                )
            )
    return errors


# The checks below concern a production deployment (DEPLOYMENT=production). Those
# tagged deploy=True run only with `manage.py check --deploy`, because they read
# files or open a connection.

# Boolean settings that are on by default in production.
PRODUCTION_SWITCHES = (
    "SECURE_SSL_REDIRECT",
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_CONTENT_TYPE_NOSNIFF",
)
# Seconds the broker check waits to connect.
BROKER_CHECK_TIMEOUT = 2.0


def _production() -> bool:
    return bool(settings.DEPLOYMENT == "production")


@register(Tags.security)
def check_debug_in_production(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """portal.E001: DEBUG is on in production."""
    if _production() and settings.DEBUG:
        return [
            Error(
                "DEBUG is on in production, so error pages show code, settings "
                "and request data to anyone.",
                hint="Set DEBUG=false, or DEPLOYMENT=development outside production.",
                id="portal.E001",
            )
        ]
    return []


@register(Tags.security)
def check_secret_key_in_production(
    app_configs: Any, **kwargs: Any
) -> list[CheckMessage]:
    """portal.E002: SECRET_KEY is the development default or too weak."""
    if not _production():
        return []
    key = settings.SECRET_KEY
    weak = key.startswith("django-insecure-") or len(key) < 50 or len(set(key)) < 5
    if not weak:
        return []
    return [
        Error(
            "SECRET_KEY is the development default, shorter than 50 characters or "
            "made of fewer than 5 distinct characters, so sessions and password "
            "reset links can be forged.",
            hint=(
                "Set SECRET_KEY to a long random value, e.g. the output of "
                '`python -c "import secrets; print(secrets.token_urlsafe(64))"`.'
            ),
            id="portal.E002",
        )
    ]


@register(Tags.security)
def check_security_settings(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """portal.W001: a production security setting is turned off."""
    if not _production():
        return []
    off = [name for name in PRODUCTION_SWITCHES if not getattr(settings, name)]
    if settings.SECURE_HSTS_SECONDS <= 0:
        off.append("SECURE_HSTS_SECONDS")
    if settings.X_FRAME_OPTIONS != "DENY":
        off.append("X_FRAME_OPTIONS")
    if settings.CONTENT_SECURITY_POLICY != "enforce":
        off.append("CONTENT_SECURITY_POLICY")
    if not off:
        return []
    return [
        Warning(
            f"These security settings are off in production: {', '.join(off)}.",
            hint=(
                "Remove them from the environment to get the production defaults "
                "(listed in the README), or set each one on."
            ),
            id="portal.W001",
        )
    ]


@register(Tags.security)
def check_shared_cache(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """portal.W003: the login lockout counts in a per-process cache."""
    if not _production():
        return []
    backend = settings.CACHES["default"]["BACKEND"]
    if not backend.endswith(("LocMemCache", "DummyCache")):
        return []
    return [
        Warning(
            f"The default cache is {backend.rsplit('.', 1)[-1]}, so each web process "
            "counts failed log-ins on its own and the lockout can be evaded.",
            hint="Set CACHE_URL to a Redis shared by every process: redis://HOST:6379/1.",
            id="portal.W003",
        )
    ]


def _identity_problems(stage: str, identity: dict[str, str]) -> list[str]:
    problems = []
    has_keys = identity["aws_access_key_id"] or identity["aws_secret_access_key"]
    if bool(identity["aws_access_key_id"]) != bool(identity["aws_secret_access_key"]):
        problems.append(
            f"only one of {stage}_AWS_ACCESS_KEY_ID and {stage}_AWS_SECRET_ACCESS_KEY "
            "is set"
        )
    credentials_file = identity["gcp_credentials_file"]
    if not has_keys and not identity["aws_profile"] and not credentials_file:
        problems.append(
            "no identity is configured (neither AWS keys, an AWS profile nor a GCP "
            "credentials file), so sends use whatever credentials the host provides"
        )
    if credentials_file and not Path(credentials_file).is_file():
        problems.append(
            f"{stage}_GCP_CREDENTIALS_FILE {credentials_file} is not a file"
        )
    if not identity["aws_principal_arn"]:
        problems.append(
            f"{stage}_AWS_PRINCIPAL_ARN is empty, so the grant instructions cannot "
            "name the principal that partners allow to send"
        )
    if not identity["gcp_service_account"] and not credentials_file:
        problems.append(
            f"{stage}_GCP_SERVICE_ACCOUNT is empty, so the grant instructions cannot "
            "name the account that partners allow to publish"
        )
    return problems


@register(Tags.security, deploy=True)
def check_stage_identities(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """portal.W002: a stage's sending identity is not configured."""
    warnings: list[CheckMessage] = []
    for stage, identity in settings.STAGE_IDENTITIES.items():
        for problem in _identity_problems(stage, identity):
            warnings.append(
                Warning(
                    f"The {stage} stage's identity: {problem}.",
                    hint=f"Set the {stage}_... variables listed in the README.",
                    id="portal.W002",
                )
            )
    return warnings


@register(deploy=True)
def check_broker_reachable(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """portal.E003: the Celery broker does not accept a connection."""
    connection = Connection(
        settings.CELERY_BROKER_URL,
        connect_timeout=BROKER_CHECK_TIMEOUT,
        transport_options=getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}),
    )
    # as_uri() puts a mask in place of the password, and of a missing one too.
    where = connection.as_uri(include_password=not connection.password)
    try:
        connection.ensure_connection(max_retries=0)
    except Exception as error:
        # Each transport raises its own errors, and a check must report them
        # rather than stop `check` with a traceback.
        reason = str(error)
        if connection.password:
            reason = reason.replace(connection.password, "**")
        return [
            Error(
                f"The Celery broker at {where} cannot be reached within "
                f"{BROKER_CHECK_TIMEOUT:g} s ({type(error).__name__}: {reason}), so "
                "no event would be delivered.",
                hint="Start the broker or correct CELERY_BROKER_URL.",
                id="portal.E003",
            )
        ]
    finally:
        connection.release()
    return []
