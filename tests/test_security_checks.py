"""The portal's deployment checks (portal.E001-E003, portal.W001-W003), the
production security settings, and a clean `check --deploy` in production."""

import json
import os
import re
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.core.checks import run_checks
from pytest_django import Settings

from portal import checks
from tests.conftest import TEST_ENCRYPTION_KEY

# run_checks() includes model checks that open the database.
pytestmark = pytest.mark.django_db

PROJECT_DIR = Path(django_settings.BASE_DIR)
REDIS_BROKER = "redis://127.0.0.1:6379/0"
STRONG_SECRET_KEY = secrets.token_urlsafe(64)


def ids(messages: list[Any]) -> list[str]:
    return [message.id for message in messages]


def configured_identity(**overrides: str) -> dict[str, str]:
    identity = {
        "aws_access_key_id": "AKIAEXAMPLETESTS0001",
        "aws_secret_access_key": "tests-only-secret-access-key",
        "aws_profile": "",
        "sqs_endpoint_url": "",
        "aws_principal_arn": "arn:aws:iam::123456789012:role/portal-sender",
        "gcp_credentials_file": "",
        "gcp_service_account": "sender@portal-tests.iam.gserviceaccount.com",
        "pubsub_emulator_host": "",
    }
    identity.update(overrides)
    return identity


@pytest.fixture
def production(settings: Settings) -> Settings:
    """Production settings that pass every portal check."""
    settings.DEPLOYMENT = "production"
    settings.DEBUG = False
    settings.SECRET_KEY = STRONG_SECRET_KEY
    settings.SECURE_SSL_REDIRECT = True
    settings.SESSION_COOKIE_SECURE = True
    settings.CSRF_COOKIE_SECURE = True
    settings.SECURE_HSTS_SECONDS = 31_536_000
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    settings.SECURE_CONTENT_TYPE_NOSNIFF = True
    settings.X_FRAME_OPTIONS = "DENY"
    settings.CONTENT_SECURITY_POLICY = "enforce"
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:6379/1",
        }
    }
    settings.STAGE_IDENTITIES = {
        "TEST": configured_identity(),
        "PROD": configured_identity(),
    }
    return settings


def unused_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TestDebugInProduction:
    """portal.E001."""

    def test_debug_in_production_is_error(self, production: Settings) -> None:
        production.DEBUG = True

        [error] = checks.check_debug_in_production(None)

        assert error.id == "portal.E001"
        assert "DEBUG" in error.msg

    def test_debug_off_in_production_passes(self, production: Settings) -> None:
        assert checks.check_debug_in_production(None) == []

    def test_debug_in_development_passes(self, settings: Settings) -> None:
        settings.DEPLOYMENT = "development"
        settings.DEBUG = True

        assert checks.check_debug_in_production(None) == []

    def test_debug_check_runs_without_deploy(self, production: Settings) -> None:
        production.DEBUG = True

        assert "portal.E001" in ids(run_checks())


class TestSecretKeyInProduction:
    """portal.E002."""

    @pytest.mark.parametrize(
        "key",
        ["django-insecure-local-development-only", "short-key", "a" * 60],
    )
    def test_weak_key_is_error(self, production: Settings, key: str) -> None:
        production.SECRET_KEY = key

        [error] = checks.check_secret_key_in_production(None)

        assert error.id == "portal.E002"
        assert key not in error.msg

    def test_long_random_key_passes(self, production: Settings) -> None:
        assert checks.check_secret_key_in_production(None) == []

    def test_weak_key_in_development_passes(self, settings: Settings) -> None:
        settings.DEPLOYMENT = "development"
        settings.SECRET_KEY = "django-insecure-local-development-only"

        assert checks.check_secret_key_in_production(None) == []


class TestSecuritySettings:
    """portal.W001."""

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("SECURE_SSL_REDIRECT", False),
            ("SESSION_COOKIE_SECURE", False),
            ("CSRF_COOKIE_SECURE", False),
            ("SECURE_HSTS_SECONDS", 0),
            ("SECURE_HSTS_INCLUDE_SUBDOMAINS", False),
            ("SECURE_CONTENT_TYPE_NOSNIFF", False),
            ("X_FRAME_OPTIONS", "SAMEORIGIN"),
            ("CONTENT_SECURITY_POLICY", "report-only"),
        ],
    )
    def test_setting_off_is_warning(
        self, production: Settings, name: str, value: Any
    ) -> None:
        setattr(production, name, value)

        [warning] = checks.check_security_settings(None)

        assert warning.id == "portal.W001"
        assert name in warning.msg

    def test_all_on_passes(self, production: Settings) -> None:
        assert checks.check_security_settings(None) == []

    def test_development_passes(self, settings: Settings) -> None:
        settings.DEPLOYMENT = "development"
        settings.SESSION_COOKIE_SECURE = False

        assert checks.check_security_settings(None) == []


class TestStageIdentities:
    """portal.W002."""

    def test_configured_identities_pass(self, production: Settings) -> None:
        assert checks.check_stage_identities(None) == []

    def test_stage_without_identity_is_warning(self, production: Settings) -> None:
        production.STAGE_IDENTITIES["PROD"] = configured_identity(
            aws_access_key_id="", aws_secret_access_key=""
        )

        [warning] = checks.check_stage_identities(None)

        assert warning.id == "portal.W002"
        assert "PROD" in warning.msg
        assert "no identity is configured" in warning.msg

    def test_profile_counts_as_identity(self, production: Settings) -> None:
        production.STAGE_IDENTITIES["PROD"] = configured_identity(
            aws_access_key_id="", aws_secret_access_key="", aws_profile="prod"
        )

        assert checks.check_stage_identities(None) == []

    def test_credentials_file_counts_as_identity(
        self, production: Settings, tmp_path: Path
    ) -> None:
        key_file = tmp_path / "service-account.json"
        key_file.write_text("{}")
        production.STAGE_IDENTITIES["TEST"] = configured_identity(
            aws_access_key_id="",
            aws_secret_access_key="",
            gcp_credentials_file=str(key_file),
        )

        assert checks.check_stage_identities(None) == []

    def test_missing_credentials_file_is_warning(
        self, production: Settings, tmp_path: Path
    ) -> None:
        production.STAGE_IDENTITIES["TEST"] = configured_identity(
            gcp_credentials_file=str(tmp_path / "missing.json")
        )

        [warning] = checks.check_stage_identities(None)

        assert warning.id == "portal.W002"
        assert "TEST_GCP_CREDENTIALS_FILE" in warning.msg
        assert "missing.json" in warning.msg

    def test_half_a_key_pair_is_warning(self, production: Settings) -> None:
        production.STAGE_IDENTITIES["TEST"] = configured_identity(
            aws_secret_access_key=""
        )

        [warning] = checks.check_stage_identities(None)

        assert "only one of TEST_AWS_ACCESS_KEY_ID" in warning.msg
        assert "AKIAEXAMPLETESTS0001" not in warning.msg

    def test_missing_principal_arn_is_warning(self, production: Settings) -> None:
        production.STAGE_IDENTITIES["PROD"] = configured_identity(aws_principal_arn="")

        [warning] = checks.check_stage_identities(None)

        assert warning.id == "portal.W002"
        assert "PROD_AWS_PRINCIPAL_ARN" in warning.msg

    def test_missing_service_account_is_warning(self, production: Settings) -> None:
        production.STAGE_IDENTITIES["TEST"] = configured_identity(
            gcp_service_account=""
        )

        [warning] = checks.check_stage_identities(None)

        assert warning.id == "portal.W002"
        assert "TEST_GCP_SERVICE_ACCOUNT" in warning.msg

    def test_secret_key_never_in_message(self, production: Settings) -> None:
        production.STAGE_IDENTITIES["TEST"] = configured_identity(
            aws_access_key_id="", aws_principal_arn="", gcp_service_account=""
        )

        text = " ".join(
            f"{warning.msg} {warning.hint}"
            for warning in checks.check_stage_identities(None)
        )

        assert "tests-only-secret-access-key" not in text

    def test_identity_check_runs_only_on_deploy(self, production: Settings) -> None:
        production.STAGE_IDENTITIES["TEST"] = configured_identity(aws_principal_arn="")

        assert "portal.W002" not in ids(run_checks())
        assert "portal.W002" in ids(run_checks(include_deployment_checks=True))


class TestBrokerReachable:
    """portal.E003."""

    def test_reachable_redis_passes(self, settings: Settings) -> None:
        settings.CELERY_BROKER_URL = REDIS_BROKER

        assert checks.check_broker_reachable(None) == []

    def test_unreachable_broker_is_error(self, settings: Settings) -> None:
        port = unused_port()
        settings.CELERY_BROKER_URL = f"redis://:broker-password@127.0.0.1:{port}/0"

        [error] = checks.check_broker_reachable(None)

        assert error.id == "portal.E003"
        assert f"127.0.0.1:{port}" in error.msg
        assert "broker-password" not in error.msg
        assert "CELERY_BROKER_URL" in (error.hint or "")

    def test_broker_check_runs_only_on_deploy(self, settings: Settings) -> None:
        settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{unused_port()}/0"

        assert "portal.E003" not in ids(run_checks())
        assert "portal.E003" in ids(run_checks(include_deployment_checks=True))


class TestSharedCache:
    """portal.W003."""

    def test_local_memory_cache_is_warning(self, production: Settings) -> None:
        production.CACHES = {
            "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
        }

        [warning] = checks.check_shared_cache(None)

        assert warning.id == "portal.W003"
        assert "CACHE_URL" in (warning.hint or "")

    def test_redis_cache_passes(self, production: Settings) -> None:
        assert checks.check_shared_cache(None) == []

    def test_development_passes(self, settings: Settings) -> None:
        settings.DEPLOYMENT = "development"

        assert checks.check_shared_cache(None) == []


# The settings module under a production environment, in a fresh process.


def production_environment(tmp_path: Path, **overrides: str) -> dict[str, str]:
    key_file = tmp_path / "service-account.json"
    key_file.write_text("{}")
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("TEST_", "PROD_", "AWS_"))
    }
    environment.update(
        {
            "ENV_FILE": "",
            "DEPLOYMENT": "production",
            "DEBUG": "false",
            "SECRET_KEY": STRONG_SECRET_KEY,
            "ALLOWED_HOSTS": "portal.example.com",
            "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
            "CELERY_BROKER_URL": REDIS_BROKER,
            "CACHE_URL": "redis://127.0.0.1:6379/1",
            # Only named, never connected to: the checks read the setting.
            "EMAIL_URL": "smtp://127.0.0.1:2525",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'check.sqlite3'}",
        }
    )
    for stage in ("TEST", "PROD"):
        environment.update(
            {
                f"{stage}_AWS_ACCESS_KEY_ID": "AKIAEXAMPLETESTS0001",
                f"{stage}_AWS_SECRET_ACCESS_KEY": "tests-only-secret-access-key",
                f"{stage}_AWS_PRINCIPAL_ARN": (
                    f"arn:aws:iam::123456789012:role/portal-{stage.lower()}"
                ),
                f"{stage}_GCP_CREDENTIALS_FILE": str(key_file),
                f"{stage}_GCP_SERVICE_ACCOUNT": (
                    f"{stage.lower()}@portal.iam.gserviceaccount.com"
                ),
            }
        )
    environment.update(overrides)
    return environment


def manage(environment: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_deploy_check_is_clean_in_production(tmp_path: Path) -> None:
    result = manage(
        production_environment(tmp_path), "check", "--deploy", "--fail-level", "WARNING"
    )

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout
    assert "WARNINGS" not in result.stderr


def test_deploy_check_reports_each_problem(tmp_path: Path) -> None:
    environment = production_environment(
        tmp_path,
        DEBUG="true",
        SECRET_KEY="django-insecure-local-development-only",
        SESSION_COOKIE_SECURE="false",
        CELERY_BROKER_URL=f"redis://127.0.0.1:{unused_port()}/0",
        CACHE_URL="locmemcache://",
        PROD_AWS_PRINCIPAL_ARN="",
    )

    result = manage(environment, "check", "--deploy")

    assert result.returncode == 1
    for check_id in ("E001", "E002", "E003", "W001", "W002", "W003"):
        assert f"portal.{check_id}" in result.stderr


def test_production_defaults_are_secure(tmp_path: Path) -> None:
    names = [
        "SECURE_SSL_REDIRECT",
        "SESSION_COOKIE_SECURE",
        "CSRF_COOKIE_SECURE",
        "SECURE_HSTS_SECONDS",
        "SECURE_HSTS_INCLUDE_SUBDOMAINS",
        "SECURE_HSTS_PRELOAD",
        "X_FRAME_OPTIONS",
        "SECURE_CONTENT_TYPE_NOSNIFF",
        "SECURE_REFERRER_POLICY",
        "CACHES",
    ]
    script = (
        "import json; from django.conf import settings; "
        f"print(json.dumps({{name: getattr(settings, name) for name in {names!r}}})); "
        "print(bool(settings.SECURE_CSP))"
    )

    result = manage(production_environment(tmp_path), "shell", "-c", script)

    assert result.returncode == 0, result.stderr
    values_line, csp_line = result.stdout.strip().splitlines()[-2:]
    values = json.loads(values_line)
    assert values["SECURE_SSL_REDIRECT"] is True
    assert values["SESSION_COOKIE_SECURE"] is True
    assert values["CSRF_COOKIE_SECURE"] is True
    assert values["SECURE_HSTS_SECONDS"] == 31_536_000
    assert values["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is True
    assert values["SECURE_HSTS_PRELOAD"] is True
    assert values["X_FRAME_OPTIONS"] == "DENY"
    assert values["SECURE_CONTENT_TYPE_NOSNIFF"] is True
    assert values["SECURE_REFERRER_POLICY"] == "same-origin"
    assert values["CACHES"]["default"]["BACKEND"].endswith("RedisCache")
    assert csp_line == "True"


def test_unknown_deployment_stops_startup(tmp_path: Path) -> None:
    result = manage(production_environment(tmp_path, DEPLOYMENT="staging"), "check")

    assert result.returncode == 1
    assert "DEPLOYMENT is 'staging'" in result.stderr


# The Content Security Policy on responses.


def test_admin_login_sends_policy_with_nonce(client: Any) -> None:
    response = client.get("/admin/login/")

    policy = response["Content-Security-Policy"]
    # script-src and style-src carry the same nonce.
    [nonce] = set(re.findall(r"'nonce-([^']+)'", policy))
    assert "default-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "object-src 'none'" in policy
    assert f'nonce="{nonce}"' in response.text


def test_each_response_gets_new_nonce(client: Any) -> None:
    first = client.get("/admin/login/")["Content-Security-Policy"]
    second = client.get("/admin/login/")["Content-Security-Policy"]

    assert re.findall(r"'nonce-[^']+'", first) != re.findall(r"'nonce-[^']+'", second)


def test_report_only_mode_sends_report_header(settings: Settings, client: Any) -> None:
    policy = settings.SECURE_CSP
    settings.SECURE_CSP = {}
    settings.SECURE_CSP_REPORT_ONLY = policy

    response = client.get("/admin/login/")

    assert "Content-Security-Policy" not in response
    assert "default-src 'self'" in response["Content-Security-Policy-Report-Only"]
