"""Reach one IMAP account: the settings, the reconnect backoff and the connection itself.

:func:`connect` opens a connection over implicit TLS, STARTTLS or plain text
and logs in; :func:`close` ends it. The watcher in
:mod:`mailpush.server.mailbox.imap` uses both for its watching connection and
for the short ones that change a mail's read state.
"""

import ipaddress
import logging
import random
import ssl
from dataclasses import dataclass, field

from imapclient import IMAPClient
from imapclient.exceptions import CapabilityError, IMAPClientError, LoginError

from mailpush.errors import AuthenticationError, ConfigError

log = logging.getLogger(__name__)

# RFC 2177 section 3: a server may log off a client that idles for 30 minutes,
# so a client should re-issue IDLE at least every 29 minutes.
MAX_IDLE_RENEW_S = 29 * 60


@dataclass(frozen=True)
class ImapConfig:
    """How to reach and watch one IMAP folder.

    Attributes:
        host: The IMAP server's name or address.
        username: The login name.
        password: The password, already resolved by the caller; never logged.
        port: The TCP port; defaults to 993 with ``tls``, else 143.
        tls: Use implicit TLS (IMAPS), checking the certificate.
        starttls: Upgrade a plain connection with STARTTLS; excludes ``tls``.
        ca_file: A PEM file of CA certificates to trust instead of the system's.
        folder: The folder to watch.
        idle_renew_s: Seconds after which IDLE is ended and issued again.
        noop_every_s: Seconds of silence during IDLE after which a NOOP checks the connection.
        poll_s: Seconds between two checks on a server without IDLE.
        flags_sync_s: Seconds between two read-state checks of the handled
            mail, besides those the server's flag change reports start.
        timeout_s: Socket timeout in seconds for connecting and for every response.
        reconnect_min_s: First delay in seconds before reconnecting.
        reconnect_max_s: Maximum delay in seconds between reconnection attempts.
        retry_s: Seconds to wait after ``on_mail`` raised before offering the mail again.
    """

    host: str
    username: str
    password: str = field(repr=False)
    port: int | None = None
    tls: bool = True
    starttls: bool = False
    ca_file: str | None = None
    folder: str = "INBOX"
    idle_renew_s: float = 600.0
    noop_every_s: float = 120.0
    poll_s: float = 30.0
    flags_sync_s: float = 60.0
    timeout_s: float = 30.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 300.0
    retry_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.host or not self.username:
            msg = "imap: host and username are required; set both in the IMAP account config"
            raise ConfigError(msg)
        if self.tls and self.starttls:
            msg = "imap: tls and starttls are both set; use tls for port 993 or starttls for 143"
            raise ConfigError(msg)
        if self.port is not None and not 0 < self.port < 65536:
            msg = f"imap: port {self.port} is invalid; set a port between 1 and 65535"
            raise ConfigError(msg)
        if not 0 < self.idle_renew_s <= MAX_IDLE_RENEW_S:
            msg = (
                f"imap: idle_renew_s = {self.idle_renew_s} is invalid; set 1 to {MAX_IDLE_RENEW_S}"
                " s, because servers may drop an IDLE older than 30 minutes (RFC 2177)"
            )
            raise ConfigError(msg)
        positive = ("noop_every_s", "poll_s", "flags_sync_s", "timeout_s", "reconnect_min_s")
        for name in (*positive, "retry_s"):
            if getattr(self, name) <= 0:
                msg = f"imap: {name} = {getattr(self, name)} is invalid; set a positive number"
                raise ConfigError(msg)
        if self.reconnect_max_s < self.reconnect_min_s:
            msg = "imap: reconnect_max_s is below reconnect_min_s; raise reconnect_max_s"
            raise ConfigError(msg)

    @property
    def effective_port(self) -> int:
        """Return the configured port, or the standard one for the chosen transport."""
        if self.port is not None:
            return self.port
        return 993 if self.tls else 143


class Backoff:
    """Capped exponential backoff with jitter: each delay is drawn from [d/2, d].

    Args:
        first_s: The delay d of the first attempt, in seconds; it doubles with each failure.
        max_s: The cap on d, in seconds.
    """

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.failures = 0

    def next_delay(self) -> float:
        """Count one more failure and return the seconds to wait before the next attempt."""
        delay = min(self.max_s, self.first_s * 2**self.failures)
        self.failures += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        """Start again from ``first_s``, after a connection succeeded."""
        self.failures = 0


def connect(config: ImapConfig, where: str, *, warn_plaintext: bool = True) -> IMAPClient:
    """Open a connection to the IMAP server, upgrade it with STARTTLS if set, and log in.

    Args:
        config: The server and account.
        where: The account and folder, as log lines and errors name them.
        warn_plaintext: Log a warning if the password would travel unencrypted
            to a host that is not a loopback address.

    Raises:
        AuthenticationError: The server rejected the login.
        ConfigError: The server lacks STARTTLS although ``starttls`` is set.
    """
    context = None
    if config.tls or config.starttls:
        context = ssl.create_default_context(cafile=config.ca_file)
    elif warn_plaintext and not _is_loopback(config.host):
        log.warning("imap: the password for %s travels unencrypted; set tls or starttls", where)

    client = IMAPClient(
        config.host,
        config.effective_port,
        ssl=config.tls,
        ssl_context=context,
        timeout=config.timeout_s,
    )
    try:
        if config.starttls:
            _starttls(client, context, config.host)
        _login(client, config, where)
    except BaseException:
        close(client, graceful=False)
        raise
    return client


def close(client: IMAPClient, graceful: bool) -> None:
    """Close a connection, with LOGOUT if ``graceful``, else by shutting the socket down."""
    try:
        if graceful:
            client.logout()
            return
    except (OSError, IMAPClientError):
        pass
    try:
        client.shutdown()
    except OSError:
        pass


def describe_error(exc: BaseException) -> str:
    """Return an exception's text on one line, or its type name if the text is empty."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _starttls(client: IMAPClient, context: ssl.SSLContext | None, host: str) -> None:
    try:
        client.starttls(context)
    except CapabilityError:
        msg = (
            f"imap: {host} does not offer STARTTLS; "
            "set tls = true (port 993) or ask the server's administrator"
        )
        raise ConfigError(msg) from None


def _login(client: IMAPClient, config: ImapConfig, where: str) -> None:
    try:
        client.login(config.username, config.password)
    except LoginError as exc:
        msg = (
            f"imap: {where} rejected the login ({describe_error(exc)}); "
            "check the username and password"
        )
        raise AuthenticationError(msg) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
