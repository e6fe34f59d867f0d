"""Broker URLs: ``mqtt://host:port`` and ``mqtts://host:port``."""

from dataclasses import dataclass
from urllib.parse import urlsplit

from mailpush.errors import ConfigError

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where a broker listens and whether the connection uses TLS."""

    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str, key: str = "broker.url") -> BrokerAddress:
    """Parse a broker URL, or raise :class:`ConfigError` naming ``key``.

    Credentials in the URL are rejected, because a URL ends up in logs and
    process listings; they belong in ``username`` and ``password_file``.
    """
    allowed = "use mqtt://HOST:PORT or mqtts://HOST:PORT"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        msg = f"{key}: invalid URL {url!r}; {allowed}"
        raise ConfigError(msg) from None

    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        msg = f"{key}: invalid URL {url!r}; {allowed}"
        raise ConfigError(msg)
    if parts.username or parts.password:
        msg = f"{key}: credentials in the URL are not allowed; set username and password_file"
        raise ConfigError(msg)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        msg = f"{key}: unexpected path or query in {url!r}; {allowed}"
        raise ConfigError(msg)

    return BrokerAddress(
        parts.hostname, port or _DEFAULT_PORTS[parts.scheme], parts.scheme == "mqtts"
    )
