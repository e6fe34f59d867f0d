"""Fixtures shared by the whole suite; each real server lives in its own module."""

pytest_plugins = [
    "tests.fixtures.mosquitto",
    "tests.fixtures.xvfb",
    "tests.fixtures.dovecot",
    "tests.fixtures.smbus",
    "tests.fixtures.gpio",
    "tests.fixtures.tls",
]
