"""The agent's config: ``agent.toml`` validated before anything starts.

The file lives in the platformdirs user config dir (``mailpush/agent.toml``)
unless ``--config`` names another. Command-line flags override the file.
Every error is one line naming the key, the value and what is allowed.
"""

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import platformdirs

from mailpush.agent.fusion import FusionConfig
from mailpush.errors import ConfigError
from mailpush.protocol.broker_url import BrokerAddress, parse_broker_url
from mailpush.protocol.ids import is_valid_id, validate_id
from mailpush.protocol.topics import DEFAULT_ROOT
from mailpush.secrets import PasswordSources
from mailpush.sensors.registry import PluginEntry
from mailpush.tables import parse_dataclass

APP_NAME = "mailpush"
CONFIG_NAME = "agent.toml"
DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
DEFAULT_HEARTBEAT_S = 60.0

_TOP_LEVEL_KEYS = {"user", "terminal", "broker", "fusion", "sensors", "receiver", "position"}


def default_config_path() -> Path:
    """Return the config file used when ``--config`` is not given."""
    return Path(platformdirs.user_config_dir(APP_NAME)) / CONFIG_NAME


def default_data_dir() -> Path:
    """Return the directory for the agent's durable data (the inbox)."""
    return Path(platformdirs.user_data_dir(APP_NAME))


def default_state_dir() -> Path:
    """Return the directory for the agent's runtime state (last published state)."""
    return Path(platformdirs.user_state_dir(APP_NAME))


@dataclass(frozen=True)
class BrokerSettings(PasswordSources):
    """The ``[broker]`` table."""

    url: str = DEFAULT_BROKER_URL
    username: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    password_command: list[str] | None = None
    ca_file: str | None = None
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: int = 60
    topic_root: str = DEFAULT_ROOT


@dataclass(frozen=True)
class ReceiverSettings:
    """The ``[receiver]`` table: how pushes are shown on this terminal."""

    notify: bool = True
    on_mail: list[str] | None = None


@dataclass(frozen=True)
class PositionSettings:
    """The ``[position]`` table: the zone this terminal is in, as the user names it."""

    zone: str | None = None


@dataclass(frozen=True)
class SensorSettings:
    """One ``[sensors.NAME]`` table: whether the plugin runs, and its validated options."""

    enabled: bool
    options: Any = None


@dataclass(frozen=True)
class AgentConfig:
    """The whole validated agent config."""

    user: str
    terminal: str
    broker: BrokerSettings
    address: BrokerAddress
    fusion: FusionConfig
    heartbeat_s: float
    receiver: ReceiverSettings
    sensors: Mapping[str, SensorSettings] = field(default_factory=dict)
    zone: str | None = None
    source: Path | None = None


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML file, or raise :class:`ConfigError` naming the file and the line."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        msg = (
            f"{path}: config file not found; "
            "run `mailpush-agent config init --user USER --terminal TERMINAL`"
        )
        raise ConfigError(msg) from None
    except tomllib.TOMLDecodeError as exc:
        msg = f"{path}: invalid TOML: {exc}"
        raise ConfigError(msg) from None
    except OSError as exc:
        msg = f"{path}: cannot read config: {exc.strerror}"
        raise ConfigError(msg) from None


def build_config(
    data: Mapping[str, Any],
    plugins: Mapping[str, PluginEntry],
    *,
    overrides: Mapping[str, Any] | None = None,
    source: Path | None = None,
) -> AgentConfig:
    """Validate a parsed config file and apply command-line overrides.

    Args:
        data: the parsed TOML document.
        plugins: the installed sensor plugins, whose option tables are checked.
        overrides: ``user``, ``terminal`` and ``broker`` from the command line; None values
            are ignored.
        source: the file ``data`` came from, kept for messages.
    """
    data = dict(data)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "broker":
            data["broker"] = {**_table(data, "broker"), "url": value}
        else:
            data[key] = value

    unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
    if unknown:
        allowed = ", ".join(sorted(_TOP_LEVEL_KEYS))
        msg = f"{unknown[0]}: unknown key; allowed top-level keys: {allowed}"
        raise ConfigError(msg)

    for key in ("user", "terminal"):
        if key not in data:
            msg = f"{key}: missing; set it in the config file or pass --{key}"
            raise ConfigError(msg)
    user = validate_id(data["user"], "user")
    terminal = validate_id(data["terminal"], "terminal")

    broker = parse_dataclass(BrokerSettings, _table(data, "broker"), "broker")
    _check_account(broker.username, user, terminal)
    address = parse_broker_url(broker.url)
    if broker.keepalive_s < 5:
        msg = f"broker.keepalive_s: invalid value {broker.keepalive_s}; use 5 or more seconds"
        raise ConfigError(msg)
    if broker.ca_file and not Path(broker.ca_file).expanduser().is_file():
        msg = f"broker.ca_file: {broker.ca_file!r} not found; give the CA certificate's path"
        raise ConfigError(msg)

    fusion_table = dict(_table(data, "fusion"))
    allowed_fusion = {field.name for field in dataclasses.fields(FusionConfig)} | {"heartbeat_s"}
    unknown_fusion = sorted(set(fusion_table) - allowed_fusion)
    if unknown_fusion:
        msg = f"fusion.{unknown_fusion[0]}: unknown key; allowed keys: {', '.join(sorted(allowed_fusion))}"
        raise ConfigError(msg)
    heartbeat_s = fusion_table.pop("heartbeat_s", DEFAULT_HEARTBEAT_S)
    is_number = isinstance(heartbeat_s, int | float) and not isinstance(heartbeat_s, bool)
    if not is_number or not math.isfinite(heartbeat_s) or heartbeat_s < 1:
        msg = (
            f"fusion.heartbeat_s: invalid value {heartbeat_s!r}; use a number of seconds, 1 or more"
        )
        raise ConfigError(msg)
    fusion = parse_dataclass(FusionConfig, fusion_table, "fusion")

    receiver = parse_dataclass(ReceiverSettings, _table(data, "receiver"), "receiver")
    sensors = _build_sensors(_table(data, "sensors"), plugins)
    zone = _zone(parse_dataclass(PositionSettings, _table(data, "position"), "position"), sensors)

    return AgentConfig(
        user=user,
        terminal=terminal,
        broker=broker,
        address=address,
        fusion=fusion,
        heartbeat_s=float(heartbeat_s),
        receiver=receiver,
        sensors=sensors,
        source=source,
        zone=zone,
    )


def load_config(
    path: Path | None,
    plugins: Mapping[str, PluginEntry],
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Read and validate the config file; a missing default file is fine with overrides.

    When no ``--config`` was given and the default file does not exist, the
    config comes from the command-line flags alone, so ``--user`` and
    ``--terminal`` are enough to start.
    """
    explicit = path is not None
    path = path or default_config_path()
    overrides = overrides or {}
    given = overrides.get("user") is not None and overrides.get("terminal") is not None
    if not explicit and not path.exists() and given:
        return build_config({}, plugins, overrides=overrides)
    return build_config(read_config_file(path), plugins, overrides=overrides, source=path)


def _build_sensors(
    tables: Mapping[str, Any], plugins: Mapping[str, PluginEntry]
) -> dict[str, SensorSettings]:
    for name, table in tables.items():
        if name not in plugins:
            installed = ", ".join(sorted(plugins)) or "none"
            msg = f"sensors.{name}: no sensor plugin named {name!r} is installed; installed: {installed}"
            raise ConfigError(msg)
        if not isinstance(table, dict):
            msg = f"sensors.{name}: expected a table ([sensors.{name}])"
            raise ConfigError(msg)

    settings = {}
    for name, entry in plugins.items():
        table = dict(tables.get(name, {}))
        plugin = entry.plugin
        default = plugin.enabled_by_default if plugin is not None else False
        enabled = table.pop("enabled", default if name not in tables else True)
        if not isinstance(enabled, bool):
            msg = f"sensors.{name}.enabled: invalid value {enabled!r}; expected true or false"
            raise ConfigError(msg)

        options = plugin.parse_options(table) if plugin is not None else None
        if enabled and plugin is not None:
            plugin.check_enabled(options)
        settings[name] = SensorSettings(enabled=enabled, options=options)
    return settings


def _zone(position: PositionSettings, sensors: Mapping[str, SensorSettings]) -> str | None:
    """Return the terminal's zone: ``[position] zone``, else the enabled PIR sensor's zone."""
    zone = position.zone
    if zone is None:
        pir = sensors.get("pir")
        if pir is not None and pir.enabled:
            zone = getattr(pir.options, "zone", None)
    if zone is not None and not 1 <= len(zone.strip()) <= 64:
        msg = f"position.zone: invalid value {zone!r}; use a name of 1 to 64 characters, such as study"
        raise ConfigError(msg)
    return zone.strip() if zone is not None else None


def _check_account(username: str | None, user: str, terminal: str) -> None:
    """Reject an account that ``mailpush-server accounts add`` made for another terminal.

    Such an account may publish only that terminal's topics, so the agent
    would run without an error while the broker drops everything it sends,
    and it would share that terminal's client session. Usernames of other
    shapes are left alone, since other brokers name accounts their own way.
    """
    if username is None or username.count(".") != 1:
        return
    account_user, account_terminal = username.split(".")
    if not (is_valid_id(account_user) and is_valid_id(account_terminal)):
        return
    if (account_user, account_terminal) != (user, terminal):
        msg = (
            f"broker.username: {username!r} is the account of terminal "
            f"{account_user}/{account_terminal}, not of {user}/{terminal}; use {user}.{terminal} "
            f"(mailpush-server accounts add {user} {terminal} creates it)"
        )
        raise ConfigError(msg)


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        msg = f"{key}: expected a table ([{key}]), got {value!r}"
        raise ConfigError(msg)
    return value
