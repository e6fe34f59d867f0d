"""The push service's config: ``server.toml`` validated before anything starts.

The file lives in the platformdirs user config dir (``mailpush/server.toml``)
unless ``--config`` names another. Without a file, the service runs on the
embedded defaults: the embedded broker on 127.0.0.1:1883 and one user whose
mail arrives in a local Maildir. Every error is one line naming the key.
"""

import getpass
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import platformdirs

from mailpush.errors import ConfigError
from mailpush.protocol.broker_url import BrokerAddress, parse_broker_url
from mailpush.protocol.ids import is_valid_id, validate_id
from mailpush.protocol.topics import DEFAULT_ROOT
from mailpush.secrets import PasswordSources, read_secret
from mailpush.server.mailbox.imap import ImapConfig
from mailpush.tables import parse_table

APP_NAME = "mailpush"
CONFIG_NAME = "server.toml"
EMBEDDED_LISTEN = "127.0.0.1:1883"

_TOP_LEVEL_KEYS = {"broker", "service", "users"}
_IMAP_KEYS = {
    "kind", "host", "port", "tls", "starttls", "ca_file", "username", "password_file",
    "password_env", "password_command", "folder", "idle_renew_s", "noop_every_s", "poll_s",
    "timeout_s", "flags_sync_s",
}  # fmt: skip


def default_config_path() -> Path:
    """Return the config file used when ``--config`` is not given."""
    return Path(platformdirs.user_config_dir(APP_NAME)) / CONFIG_NAME


def default_state_dir() -> Path:
    """Return where the service keeps its outbox, mailbox positions and policies."""
    return Path(platformdirs.user_state_dir(APP_NAME))


def default_maildir() -> Path:
    """Return the local Maildir watched when no mailbox is configured."""
    return Path(platformdirs.user_data_dir(APP_NAME)) / "Maildir"


def default_user() -> str:
    """Return the user id of the embedded setup: ``$MAILPUSH_USER`` or the login name."""
    import os

    name = os.environ.get("MAILPUSH_USER") or getpass.getuser()
    name = re.sub(r"[^a-z0-9_-]", "-", name.lower()).strip("-_")[:64]
    return name if is_valid_id(name) else "me"


@dataclass(frozen=True)
class BrokerSettings(PasswordSources):
    """The ``[broker]`` table; no ``url`` means the embedded broker."""

    url: str | None = None
    listen: str = EMBEDDED_LISTEN
    username: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    password_command: list[str] | None = None
    ca_file: str | None = None
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    topic_root: str = DEFAULT_ROOT
    accounts_file: str | None = None
    """The embedded broker's password file (``user:argon2-hash`` lines); with it,
    only listed accounts may connect, and ``listen`` may name a non-loopback address."""


@dataclass(frozen=True)
class ServiceSettings:
    """The ``[service]`` table: timing of routing and delivery."""

    instance: str = "main"
    state_dir: str | None = None
    stale_after_s: float = 180.0
    probe_after_s: float = 30.0
    probe_timeout_ms: int = 300
    resend_after_s: float = 30.0
    outbox_ttl_s: float = 7 * 86400.0
    sync_every_commit: bool = True
    """Sync each outbox commit to disk. False saves an fsync per commit, and then an
    OS crash or a power cut can lose about the last 0.25 s of routing records."""


@dataclass(frozen=True)
class MaildirMailbox:
    """A local Maildir, watched read-only."""

    path: Path
    create: bool = False


@dataclass(frozen=True)
class ImapMailbox:
    """An IMAP account; the password is read when the watcher starts."""

    settings: Mapping[str, Any]
    key: str

    def imap_config(self) -> ImapConfig:
        """Build the watcher config, reading the password from its source."""
        table = dict(self.settings)
        password = read_secret(
            self.key,
            file=table.pop("password_file", None),
            env=table.pop("password_env", None),
            command=table.pop("password_command", None),
        )
        if password is None:
            msg = f"{self.key}: no password source; set password_file, password_env or password_command"
            raise ConfigError(msg)
        table.pop("kind", None)
        return ImapConfig(password=password, **table)


@dataclass(frozen=True)
class UserSettings:
    """One ``[[users]]`` entry."""

    id: str
    mailbox: MaildirMailbox | ImapMailbox
    report_mode: Literal["timed", "probe", "both"] = "both"


@dataclass(frozen=True)
class ServerConfig:
    """The whole validated service config."""

    broker: BrokerSettings
    address: BrokerAddress | None
    service: ServiceSettings
    users: tuple[UserSettings, ...]
    state_dir: Path
    source: Path | None = None
    embedded: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "embedded", self.address is None)


def load_config(path: Path | None, broker_url: str | None = None) -> ServerConfig:
    """Read and validate the config; no file (and no ``--config``) means the embedded defaults."""
    explicit = path is not None
    path = path or default_config_path()
    if not explicit and not path.exists():
        data: dict[str, Any] = {}
        source = None
    else:
        data = _read(path)
        source = path
    if broker_url is not None:
        table = data.get("broker", {})
        if not isinstance(table, dict):
            msg = f"broker: expected a table ([broker]), got {table!r}"
            raise ConfigError(msg)
        data = {**data, "broker": {**table, "url": broker_url}}
    return build_config(data, source)


def build_config(data: Mapping[str, Any], source: Path | None = None) -> ServerConfig:
    """Validate a parsed config document."""
    unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
    if unknown:
        msg = f"{unknown[0]}: unknown key; allowed top-level keys: broker, service, users"
        raise ConfigError(msg)

    broker = parse_table(BrokerSettings, data.get("broker", {}), "broker")
    address = parse_broker_url(broker.url) if broker.url is not None else None
    _check_listen(broker.listen)
    service = parse_table(ServiceSettings, data.get("service", {}), "service")
    _check_service(service)
    if address is None and service.instance != ServiceSettings.instance:
        msg = (
            f"service.instance is {service.instance!r} but broker.url is not set: instances on "
            "embedded brokers cannot see each other; set broker.url to the broker they share"
        )
        raise ConfigError(msg)

    users_data = data.get("users")
    if users_data is None:
        users: tuple[UserSettings, ...] = (
            UserSettings(default_user(), MaildirMailbox(default_maildir(), create=True)),
        )
    elif not isinstance(users_data, list) or not users_data:
        msg = "users: expected one or more [[users]] tables"
        raise ConfigError(msg)
    else:
        users = tuple(_user(entry, index) for index, entry in enumerate(users_data))
    ids = [user.id for user in users]
    duplicates = sorted({user for user in ids if ids.count(user) > 1})
    if duplicates:
        msg = f"users: user id {duplicates[0]!r} appears twice; give each user one entry"
        raise ConfigError(msg)

    state_dir = Path(service.state_dir).expanduser() if service.state_dir else default_state_dir()
    return ServerConfig(broker, address, service, users, state_dir, source)


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        msg = f"{path}: config file not found; create it or omit --config for the embedded defaults"
        raise ConfigError(msg) from None
    except tomllib.TOMLDecodeError as exc:
        msg = f"{path}: invalid TOML: {exc}"
        raise ConfigError(msg) from None
    except OSError as exc:
        msg = f"{path}: cannot read config: {exc.strerror}"
        raise ConfigError(msg) from None


def _check_listen(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        msg = f'broker.listen: invalid value {listen!r}; use HOST:PORT such as "127.0.0.1:1883"'
        raise ConfigError(msg)


def _check_service(service: ServiceSettings) -> None:
    validate_id(service.instance, "service.instance")
    for key in ("stale_after_s", "probe_after_s", "resend_after_s", "outbox_ttl_s"):
        value = getattr(service, key)
        if value < 0:
            msg = f"service.{key}: invalid value {value}; use 0 or more seconds"
            raise ConfigError(msg)
    if not 0 <= service.probe_timeout_ms <= 60_000:
        msg = f"service.probe_timeout_ms: invalid value {service.probe_timeout_ms}; use 0 to 60000"
        raise ConfigError(msg)


def _user(entry: Any, index: int) -> UserSettings:
    where = f"users[{index}]"
    if not isinstance(entry, dict):
        msg = f"{where}: expected a table with id and mailbox"
        raise ConfigError(msg)
    unknown = sorted(set(entry) - {"id", "mailbox", "report_mode"})
    if unknown:
        msg = f"{where}.{unknown[0]}: unknown key; allowed keys: id, mailbox, report_mode"
        raise ConfigError(msg)
    if "id" not in entry:
        msg = f"{where}.id: missing; give each user an id"
        raise ConfigError(msg)
    user_id = validate_id(entry["id"], f"{where}.id")

    report_mode = entry.get("report_mode", "both")
    if report_mode not in ("timed", "probe", "both"):
        msg = f"{where}.report_mode: invalid value {report_mode!r}; use timed, probe or both"
        raise ConfigError(msg)

    mailbox = entry.get("mailbox")
    if mailbox is None:
        parsed: MaildirMailbox | ImapMailbox = MaildirMailbox(default_maildir(), create=True)
    else:
        parsed = _mailbox(mailbox, f"{where}.mailbox")
    return UserSettings(user_id, parsed, report_mode)


def _mailbox(table: Any, where: str) -> MaildirMailbox | ImapMailbox:
    if not isinstance(table, dict):
        msg = f'{where}: expected a table such as {{ kind = "maildir", path = "..." }}'
        raise ConfigError(msg)
    kind = table.get("kind")
    if kind == "maildir":
        unknown = sorted(set(table) - {"kind", "path"})
        if unknown:
            msg = f"{where}.{unknown[0]}: unknown key; a maildir mailbox takes kind and path"
            raise ConfigError(msg)
        path = table.get("path")
        if not isinstance(path, str) or not path:
            msg = f"{where}.path: missing; give the Maildir folder (the one with cur/ and new/)"
            raise ConfigError(msg)
        return MaildirMailbox(Path(path).expanduser())
    if kind == "imap":
        unknown = sorted(set(table) - _IMAP_KEYS)
        if unknown:
            allowed = ", ".join(sorted(_IMAP_KEYS))
            msg = f"{where}.{unknown[0]}: unknown key; allowed keys: {allowed}"
            raise ConfigError(msg)
        for key in ("host", "username"):
            if not isinstance(table.get(key), str) or not table[key]:
                msg = f"{where}.{key}: missing; an imap mailbox needs host and username"
                raise ConfigError(msg)
        mailbox = ImapMailbox(table, where)
        _check_imap_types(table, where)
        return mailbox
    msg = f'{where}.kind: invalid value {kind!r}; use "imap" or "maildir"'
    raise ConfigError(msg)


def _check_imap_types(table: Mapping[str, Any], where: str) -> None:
    expected: dict[str, tuple[type, ...]] = {
        "port": (int,),
        "tls": (bool,),
        "starttls": (bool,),
        "idle_renew_s": (int, float),
        "noop_every_s": (int, float),
        "poll_s": (int, float),
        "timeout_s": (int, float),
        "flags_sync_s": (int, float),
    }
    for key, types in expected.items():
        if key not in table:
            continue
        value = table[key]
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types):
            names = " or ".join("true or false" if t is bool else "a number" for t in types)
            msg = f"{where}.{key}: invalid value {value!r}; expected {names}"
            raise ConfigError(msg)
    # Build once without the password so ImapConfig's own checks run at load time.
    settings = {
        k: v
        for k, v in table.items()
        if k not in ("kind", "password_file", "password_env", "password_command")
    }
    try:
        ImapConfig(password="", **settings)
    except ConfigError as exc:
        msg = f"{where}: {exc}".replace(f"{where}: imap: ", f"{where}: ")
        raise ConfigError(msg) from None
