"""System checks on ENCRYPTION_KEYS (destinations.E001 and destinations.E002) and on
the delivery engine's settings (delivery.E001)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from django.core.checks import Error, run_checks
from pytest_django import Settings

from portal.checks import check_encryption_keys, check_engine_settings

pytestmark = pytest.mark.django_db

# A key with its last character lost, as a bad paste leaves it. It stands in for a
# real secret, so no message may show it.
MALFORMED_KEY = "c2VjcmV0LXRoYXQtbXVzdC1ub3QtYmUtc2hvd24tMDA"
PROJECT_DIR = Path(__file__).resolve().parent.parent


def encryption_errors() -> list[Error]:
    return [
        message
        for message in run_checks()
        if isinstance(message, Error)
        and (message.id or "").startswith("destinations.E")
    ]


def test_empty_keys_report_e001(settings: Settings) -> None:
    settings.ENCRYPTION_KEYS = []

    errors = encryption_errors()

    assert [error.id for error in errors] == ["destinations.E001"]
    assert "ENCRYPTION_KEYS" in errors[0].msg
    assert "Fernet.generate_key()" in (errors[0].hint or "")


def test_malformed_key_reports_e002(settings: Settings) -> None:
    settings.ENCRYPTION_KEYS = [Fernet.generate_key().decode(), MALFORMED_KEY]

    errors = encryption_errors()

    assert [error.id for error in errors] == ["destinations.E002"]
    assert "entry 2" in errors[0].msg


def test_malformed_key_message_hides_value(settings: Settings) -> None:
    settings.ENCRYPTION_KEYS = [MALFORMED_KEY]

    [error] = check_encryption_keys(None)

    assert error.id == "destinations.E002"
    assert "entry 1" in error.msg
    assert MALFORMED_KEY not in error.msg
    assert MALFORMED_KEY[:12] not in error.msg
    assert MALFORMED_KEY not in (error.hint or "")


def test_blank_entry_reports_its_position(settings: Settings) -> None:
    # ENCRYPTION_KEYS="KEY, " in the environment gives a second entry of one space.
    settings.ENCRYPTION_KEYS = [Fernet.generate_key().decode(), " "]

    [error] = check_encryption_keys(None)

    assert error.id == "destinations.E002"
    assert "entry 2" in error.msg


def test_good_keys_pass_checks(settings: Settings) -> None:
    settings.ENCRYPTION_KEYS = [
        Fernet.generate_key().decode(),
        Fernet.generate_key().decode(),
    ]

    assert check_encryption_keys(None) == []
    assert encryption_errors() == []


def test_manage_check_exits_nonzero_without_keys() -> None:
    # ENV_FILE empty: a developer's .env must not supply the keys.
    environment = {**os.environ, "ENV_FILE": "", "ENCRYPTION_KEYS": ""}

    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=PROJECT_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 1
    assert "destinations.E001" in result.stderr


def test_empty_database_url_uses_default() -> None:
    environment = {
        **os.environ,
        "ENV_FILE": "",
        "DATABASE_URL": "",
        "ENCRYPTION_KEYS": Fernet.generate_key().decode(),
    }

    result = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "shell",
            "-c",
            "from django.db import connection; print(connection.vendor)",
        ],
        cwd=PROJECT_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    # The last line: Django's shell first reports the objects it imported.
    assert result.stdout.strip().splitlines()[-1] == "sqlite"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DELIVERY_CLAIM_SIZE", 0),
        ("DELIVERY_RUN_SIZE", -1),
        ("DELIVERY_LEASE_SECONDS", 0),
        ("PUBSUB_BATCH_LATENCY", -0.5),
    ],
)
def test_engine_setting_below_minimum_reports_e001(
    settings: Settings, name: str, value: float
) -> None:
    setattr(settings, name, value)

    errors = check_engine_settings(None)

    assert [error.id for error in errors] == ["delivery.E001"]
    assert f"{name} is {value}" in errors[0].msg
    assert f"Set {name}" in (errors[0].hint or "")


def test_default_engine_settings_pass() -> None:
    assert check_engine_settings(None) == []
