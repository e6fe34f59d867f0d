"""The exception hierarchy shared by every mailpush component.

Every error a user can cause derives from :class:`MailpushError`, and also from
the builtin it resembles, so callers may catch either. The command-line tools
turn these into one line on stderr and the exit code named by ``exit_code``.
"""


class MailpushError(Exception):
    """Base class for expected mailpush failures: bad input, a refused login."""

    exit_code = 1


class ConfigError(MailpushError, ValueError):
    """A config file, CLI option or plugin option is missing or invalid."""

    exit_code = 2


class InvalidIdError(ConfigError):
    """A user or terminal id does not match the protocol's id pattern."""


class PayloadError(MailpushError, ValueError):
    """An MQTT payload is not valid JSON or does not match its message type."""


class BrokerError(MailpushError, ConnectionError):
    """The MQTT broker cannot be reached, or the connection failed."""


class AuthenticationError(BrokerError):
    """The broker or mail server rejected the credentials; retrying cannot help."""

    exit_code = 3


class SensorError(MailpushError, RuntimeError):
    """A sensor read failed (an I2C error, a device that went away)."""
