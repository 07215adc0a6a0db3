"""Settings, read from the environment through django-environ.

Every variable and its default is listed in the README. A `.env` file in the project
folder (or the file named by ENV_FILE) is read first; real environment variables win.
"""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"
VAR_DIR.mkdir(exist_ok=True)

env = environ.Env()
_env_file = env.str("ENV_FILE", default=str(BASE_DIR / ".env"))
if _env_file and Path(_env_file).is_file():
    env.read_env(_env_file)

DEBUG = env.bool("DEBUG", default=False)
# "production" turns on the production defaults below (HTTPS only, secure cookies,
# HSTS) and the portal.* checks of a production deployment. Any other deployment is
# "development", which also covers tests.
DEPLOYMENT = env.str("DEPLOYMENT", default="development")
if DEPLOYMENT not in ("development", "production"):
    raise ImproperlyConfigured(
        f"DEPLOYMENT is {DEPLOYMENT!r}; set it to production or development."
    )
PRODUCTION = DEPLOYMENT == "production"
# Django's deploy check (security.W009) flags any key starting with "django-insecure-".
SECRET_KEY = env.str("SECRET_KEY", default="django-insecure-local-development-only")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# HTTPS and browser protections, each on by default in production.
# Behind a proxy that terminates TLS: trust its X-Forwarded-Proto header for
# request.is_secure(), and the last X-Forwarded-For address as the client's.
BEHIND_PROXY = env.bool("BEHIND_PROXY", default=False)
if BEHIND_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=PRODUCTION)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=PRODUCTION)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=PRODUCTION)
# One year, the minimum that browsers' HSTS preload lists accept.
SECURE_HSTS_SECONDS = env.int(
    "SECURE_HSTS_SECONDS", default=365 * 24 * 3600 if PRODUCTION else 0
)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool(
    "SECURE_HSTS_INCLUDE_SUBDOMAINS", default=PRODUCTION
)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=PRODUCTION)
X_FRAME_OPTIONS = env.str("X_FRAME_OPTIONS", default="DENY")
SECURE_CONTENT_TYPE_NOSNIFF = env.bool("SECURE_CONTENT_TYPE_NOSNIFF", default=True)
SECURE_REFERRER_POLICY = env.str("SECURE_REFERRER_POLICY", default="same-origin")

# Content Security Policy: only this site's own scripts, styles, images and fonts,
# and inline ones only with the per-response nonce (Django's admin templates add
# it). "report-only" sends the policy without enforcing it; "off" sends none.
CONTENT_SECURITY_POLICY = env.str("CONTENT_SECURITY_POLICY", default="enforce")
if CONTENT_SECURITY_POLICY not in ("enforce", "report-only", "off"):
    raise ImproperlyConfigured(
        f"CONTENT_SECURITY_POLICY is {CONTENT_SECURITY_POLICY!r}; set it to "
        "enforce, report-only or off."
    )
_csp_policy = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF, CSP.NONCE],
    "style-src": [CSP.SELF, CSP.NONCE],
    # data: for the empty favicon of the status pages.
    "img-src": [CSP.SELF, "data:"],
    "font-src": [CSP.SELF],
    "connect-src": [CSP.SELF],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.NONE],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
}
SECURE_CSP = _csp_policy if CONTENT_SECURITY_POLICY == "enforce" else {}
SECURE_CSP_REPORT_ONLY = _csp_policy if CONTENT_SECURITY_POLICY == "report-only" else {}

# Django's error pages and error e-mails pass through this filter, which masks
# secrets even with DEBUG on.
DEFAULT_EXCEPTION_REPORTER_FILTER = "portal.debug.SecretsExceptionReporterFilter"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "portal",
    "destinations",
    "delivery",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django.template.context_processors.csp",
            ],
        },
    },
]

# An empty DATABASE_URL means the default, as an unset one does.
DATABASES = {
    "default": env.db_url_config(
        env.str("DATABASE_URL", default="") or f"sqlite:///{VAR_DIR / 'portal.sqlite3'}"
    ),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web server and the worker write to one file: wait for the lock instead of
    # failing at once, and take it at BEGIN so a read never upgrades into a deadlock.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL;",
    }
    # A file, not memory, so that a worker process started by the tests can open it.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Local memory by default, which each process keeps on its own. Production sets a
# shared Redis (redis://host:6379/1), so that the login lockout counts across
# processes.
CACHES = {"default": env.cache_url("CACHE_URL", default="locmemcache://")}

# Login lockout: this many failed log-ins for one username, or from one client
# address, within the window lock it for LOGIN_LOCKOUT_SECONDS.
LOGIN_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=5)
LOGIN_FAILURE_WINDOW = env.int("LOGIN_FAILURE_WINDOW", default=15 * 60)
LOGIN_LOCKOUT_SECONDS = env.int("LOGIN_LOCKOUT_SECONDS", default=15 * 60)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"

# App developers sign in here to the status pages; staff use the admin's own login.
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "status:home"
LOGOUT_REDIRECT_URL = "login"

# Fernet keys (urlsafe base64, 32 bytes) for secrets at rest, comma separated. The
# first encrypts; all of them decrypt, so an old key stays listed until
# `manage.py rotate_secrets` has re-encrypted everything with the new one.
ENCRYPTION_KEYS = env.list("ENCRYPTION_KEYS", default=[])

# The platform's sending identity for each stage. TEST and PROD use different
# credentials so that TEST data can never reach a queue that only trusts PROD.
STAGE_IDENTITIES = {
    stage: {
        "aws_access_key_id": env.str(f"{stage}_AWS_ACCESS_KEY_ID", default=""),
        "aws_secret_access_key": env.str(f"{stage}_AWS_SECRET_ACCESS_KEY", default=""),
        "aws_profile": env.str(f"{stage}_AWS_PROFILE", default=""),
        "sqs_endpoint_url": env.str(f"{stage}_SQS_ENDPOINT_URL", default=""),
        # The IAM role or user ARN partners grant sqs:SendMessage to, shown in the
        # grant instructions.
        "aws_principal_arn": env.str(f"{stage}_AWS_PRINCIPAL_ARN", default=""),
        # A service account key file; empty uses application default credentials.
        "gcp_credentials_file": env.str(f"{stage}_GCP_CREDENTIALS_FILE", default=""),
        # The account partners grant roles/pubsub.publisher to, shown in messages.
        "gcp_service_account": env.str(f"{stage}_GCP_SERVICE_ACCOUNT", default=""),
        # host:port of a local Pub/Sub peer, as PUBSUB_EMULATOR_HOST expects.
        "pubsub_emulator_host": env.str(f"{stage}_PUBSUB_EMULATOR_HOST", default=""),
    }
    for stage in ("TEST", "PROD")
}

# Seconds that one SQS call may take before it counts as a transient timeout.
SQS_TIMEOUT = env.float("SQS_TIMEOUT", default=10.0)
# Seconds to wait for one Pub/Sub publish result. The client's own retry would go on
# for up to 600 s.
PUBSUB_TIMEOUT = env.float("PUBSUB_TIMEOUT", default=10.0)
# Seconds the Pub/Sub client waits for more messages before it sends a batch. The
# engine gives it a whole round at once, so this stays short (the client's own
# default is 0.01).
PUBSUB_BATCH_LATENCY = env.float("PUBSUB_BATCH_LATENCY", default=0.002)
# Seconds one Service Bus send may take, retries included.
SERVICEBUS_TIMEOUT = env.float("SERVICEBUS_TIMEOUT", default=10.0)

# The delivery engine.
# Deliveries one worker claims per round.
DELIVERY_CLAIM_SIZE = env.int("DELIVERY_CLAIM_SIZE", default=500)
# On a destination that keeps order, the maximum number of deliveries of one ordering
# key that go out in one round, in order, starting with the key's oldest.
DELIVERY_RUN_SIZE = env.int("DELIVERY_RUN_SIZE", default=20)
# Seconds a claim lasts; a delivery still unrecorded after that is sent again. It must
# exceed the longest send, timeouts and retries of the transports included.
DELIVERY_LEASE_SECONDS = env.int("DELIVERY_LEASE_SECONDS", default=120)
# Seconds one task keeps sending before it queues a follow-up and yields.
DELIVERY_DRAIN_SECONDS = env.float("DELIVERY_DRAIN_SECONDS", default=20.0)
# Wake-up messages per publish; more lets more worker processes send at once.
DELIVERY_WAKE_TASKS = env.int("DELIVERY_WAKE_TASKS", default=2)
# Seconds between sweeps (Celery beat).
SWEEP_INTERVAL = env.float("SWEEP_INTERVAL", default=5.0)
# A destination whose every attempt failed for this long, or this many attempts in
# a row, is disabled and its application's contacts are e-mailed.
AUTO_DISABLE_AFTER_HOURS = env.float("AUTO_DISABLE_AFTER_HOURS", default=24.0)
AUTO_DISABLE_AFTER_FAILURES = env.int("AUTO_DISABLE_AFTER_FAILURES", default=1000)

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    # The folder the web process and the worker exchange task messages through; the
    # tests point it at a fresh folder of their own.
    _broker_dir = Path(
        env.str("CELERY_FILESYSTEM_BROKER_DIR", default=str(VAR_DIR / "broker"))
    )
    _broker_dir.mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir),
        "data_folder_out": str(_broker_dir),
        # Kombu's default is a "control" folder in the working directory.
        "control_folder": str(_broker_dir / "control"),
        "polling_interval": 0.2,
    }
CELERY_TASK_IGNORE_RESULT = True
CELERY_BEAT_SCHEDULE = {
    "sweep": {"task": "delivery.tasks.sweep", "schedule": SWEEP_INTERVAL},
}
CELERY_TASK_ACKS_LATE = True
# A task cut off by a lost broker connection is redelivered anyway (acks_late), and
# the delivery engine's claims make a second run harmless, so stop it at once.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
# Celery's Django fixup closes the database connection around every task unless
# configured to reuse it, and a new PostgreSQL connection costs milliseconds per
# wake-up.
CELERY_DB_REUSE_MAX = env.int("CELERY_DB_REUSE_MAX", default=1000)
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

_email = env.email_url("EMAIL_URL", default="consolemail://")
_email_options = {
    option: _email[setting]
    for option, setting in (
        ("host", "EMAIL_HOST"),
        ("port", "EMAIL_PORT"),
        ("username", "EMAIL_HOST_USER"),
        ("password", "EMAIL_HOST_PASSWORD"),
        ("use_tls", "EMAIL_USE_TLS"),
        ("use_ssl", "EMAIL_USE_SSL"),
    )
    if _email.get(setting)
}
_email_backend = _email["EMAIL_BACKEND"]
if not _email_backend.endswith("smtp.EmailBackend"):
    _email_options = {}
MAILERS = {"default": {"BACKEND": _email_backend, "OPTIONS": _email_options}}
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="portal@localhost")

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "destinations": {"level": LOG_LEVEL},
        "delivery": {"level": LOG_LEVEL},
        # botocore logs request parameters at DEBUG, which would include message bodies.
        "botocore": {"level": "WARNING"},
    },
}
