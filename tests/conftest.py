"""Fixtures shared by every test module."""

import pytest

pytest_plugins = ["tests.pubsub_fixtures"]

# A fixed Fernet key, used only by the tests, so encrypted columns can be written and
# read back; a subprocess started by the tests gets the same key.
TEST_ENCRYPTION_KEY = "8GCXAkX7PI-K05I1xX3OZBdoTOG82LI8KFR11SB4MrU="


@pytest.fixture(autouse=True)
def encryption_keys(settings: pytest.FixtureRequest) -> None:
    settings.ENCRYPTION_KEYS = [TEST_ENCRYPTION_KEY]
