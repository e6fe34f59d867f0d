"""The ``mailpush-agent`` command line."""

import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
import msgspec

from mailpush import __version__, command
from mailpush.agent import template
from mailpush.agent.config import (
    AgentConfig,
    default_config_path,
    default_data_dir,
    default_state_dir,
    load_config,
)
from mailpush.agent.inbox import Inbox
from mailpush.agent.oneshot import BrokerSession
from mailpush.agent.runner import Agent, inbox_path, status_path
from mailpush.errors import BrokerError, MailpushError
from mailpush.protocol.ids import validate_id
from mailpush.protocol.messages import MailStatus, encode
from mailpush.protocol.topics import Topics
from mailpush.sensors.base import Health
from mailpush.sensors.registry import PluginEntry, discover


class _Context:
    def __init__(self, config: Path | None, overrides: dict[str, Any]) -> None:
        self.config_path = config
        self.overrides = overrides
        self._plugins: dict[str, PluginEntry] | None = None

    @property
    def plugins(self) -> dict[str, PluginEntry]:
        if self._plugins is None:
            self._plugins = discover()
        return self._plugins

    def load(self) -> AgentConfig:
        return load_config(self.config_path, self.plugins, self.overrides)


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Store a common option on the context, whether given before or after the command."""
    if value is not None:
        ctx.ensure_object(dict)[param.name] = value
    return value


def common_options(command: Any) -> Any:
    """Accept --config, --broker, --user, --terminal and --log-level on a command."""
    options = [
        click.option(
            "--config",
            "config_path",
            type=click.Path(dir_okay=False, path_type=Path),
            expose_value=False,
            callback=_remember,
            help=f"Config file to use. Default: {default_config_path()}",
        ),
        click.option(
            "--broker",
            expose_value=False,
            callback=_remember,
            help="Broker URL (mqtt://HOST:PORT or mqtts://HOST:PORT); overrides the file.",
        ),
        click.option(
            "--user", expose_value=False, callback=_remember, help="User id; overrides the file."
        ),
        click.option(
            "--terminal",
            expose_value=False,
            callback=_remember,
            help="Terminal id; overrides the file.",
        ),
        click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
            expose_value=False,
            callback=_remember,
            help="Least severe log messages to print (default: info).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _context(ctx: click.Context) -> _Context:
    """Build the command's context from the common options given anywhere on the line."""
    values: dict[str, Any] = {}
    for level in reversed(_lineage(ctx)):
        if isinstance(level.obj, dict):
            values.update(level.obj)
    logging.basicConfig(
        level=str(values.get("log_level", "info")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    overrides = {key: values.get(key) for key in ("user", "terminal", "broker")}
    return _Context(values.get("config_path"), overrides)


def _lineage(ctx: click.Context) -> list[click.Context]:
    chain = []
    current: click.Context | None = ctx
    while current is not None:
        chain.append(current)
        current = current.parent
    return chain


class _LazyGroup(click.Group):
    """A click group that imports some subcommands only when they are looked up.

    ``policy`` pulls in the policy editor, the mail parser and tomli-w, about
    1.4 MiB RSS (CPython 3.11, x86_64) that a running agent never uses.
    """

    lazy_commands = {"policy": ("mailpush.agent.policy_cli", "policy")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands and cmd_name not in self.commands:
            module_name, attribute = self.lazy_commands[cmd_name]
            module = importlib.import_module(module_name)
            self.add_command(getattr(module, attribute), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mailpush-agent")
@common_options
def cli() -> None:
    """Sense how this terminal is used and receive mail pushed to it."""


@cli.group()
def config() -> None:
    """Create and inspect the config file."""


@config.command("init")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@common_options
@click.pass_context
def config_init(ctx: click.Context, force: bool) -> None:
    """Write a commented config file for --user and --terminal."""
    obj = _context(ctx)
    user = obj.overrides.get("user")
    terminal = obj.overrides.get("terminal")
    if not user or not terminal:
        raise click.UsageError("config init needs --user and --terminal")
    validate_id(user, "--user")
    validate_id(terminal, "--terminal")

    path = obj.config_path or default_config_path()
    if path.exists() and not force:
        raise MailpushError(f"{path} already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = template.render(user, terminal, obj.overrides.get("broker"))
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    click.echo(f"wrote {path}")


@config.command("show")
@common_options
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the effective config after validation; secrets are never shown."""
    obj = _context(ctx)
    settings = obj.load()
    shown = {
        "source": str(settings.source) if settings.source else "(command-line flags)",
        "user": settings.user,
        "terminal": settings.terminal,
        "broker": {
            "url": str(settings.address),
            "username": settings.broker.username,
            "password_source": _password_source(settings),
            "ca_file": settings.broker.ca_file,
            "protocol": settings.broker.protocol,
            "topic_root": settings.broker.topic_root,
        },
        "fusion": {**dataclasses.asdict(settings.fusion), "heartbeat_s": settings.heartbeat_s},
        "receiver": dataclasses.asdict(settings.receiver),
        "sensors": {name: s.enabled for name, s in settings.sensors.items()},
    }
    click.echo(json.dumps(shown, indent=2))


@cli.command()
@common_options
@click.pass_context
def start(ctx: click.Context) -> None:
    """Run the agent in the foreground until Ctrl-C or SIGTERM."""
    obj = _context(ctx)
    settings = obj.load()
    agent = Agent(settings, obj.plugins, default_state_dir(), default_data_dir())

    def request_stop(signum: int, frame: object) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    agent.run()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@common_options
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show what this terminal senses now, per sensor, and the state last published."""
    obj = _context(ctx)
    settings = obj.load()
    path = status_path(default_state_dir(), settings.user, settings.terminal)
    recorded = _read_status(path)
    running = recorded is not None and _alive(recorded.get("pid"))
    sensors = recorded["sensors"] if running else _probe_sensors(obj.plugins, settings)

    if as_json:
        click.echo(json.dumps({"running": running, "sensors": sensors, "last": recorded}, indent=2))
        return

    click.echo(f"terminal   {settings.user}/{settings.terminal}")
    click.echo(f"broker     {settings.address}")
    agent_line = f"running (pid {recorded['pid']})" if running and recorded else "not running"
    click.echo(f"agent      {agent_line}")
    if recorded is not None:
        published = recorded["published"]
        age = time.time() - published["ts"]
        line = f"{published['state']} (confidence {published['confidence']:.2f}), {age:.0f} s ago"
        if published.get("reason"):
            line += f", reason {published['reason']}"
        click.echo(f"published  {line}")
        evidence = published.get("evidence") or {}
        if evidence:
            click.echo("evidence   " + ", ".join(f"{k}={v}" for k, v in evidence.items()))
    else:
        click.echo("published  nothing yet")
    click.echo("sensors" if running else "sensors    (read now; the agent is not running)")
    _print_sensors(sensors)


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@common_options
@click.pass_context
def sensors(ctx: click.Context, as_json: bool) -> None:
    """List every sensor plugin, whether it works on this machine, and why not."""
    if ctx.invoked_subcommand is not None:
        return
    obj = _context(ctx)
    settings = obj.load() if _config_available(obj) else None
    described = _probe_sensors(obj.plugins, settings, include_disabled=True)
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    _print_sensors(described)


@sensors.command("probe")
@click.option(
    "--bus", type=click.IntRange(min=0), required=True, help="I2C bus number N of /dev/i2c-N."
)
@common_options
@click.pass_context
def sensors_probe(ctx: click.Context, bus: int) -> None:
    """List the known temperature chips found on an I2C bus, using reads only."""
    _context(ctx)
    from mailpush.sensors.temperature.probe import describe_probe, probe_bus

    click.echo(describe_probe(bus))
    found = probe_bus(bus)
    if not found:
        click.echo("no known chip answered")
    for device in found:
        chip = device.chip or " or ".join(device.candidates) or "unknown"
        note = f" ({device.note})" if device.note else ""
        click.echo(f"  0x{device.address:02X}  {chip}{note}")


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Pushes to list."
)
@common_options
@click.pass_context
def inbox(ctx: click.Context, as_json: bool, limit: int) -> None:
    """List the pushes this terminal received, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    obj = _context(ctx)
    settings = obj.load()
    path = inbox_path(default_data_dir(), settings.user, settings.terminal)
    if not path.exists():
        if as_json:
            click.echo("[]")
        else:
            click.echo("no pushes received yet")
        return

    with Inbox(path) as store:
        pushes = store.list(limit)
    if as_json:
        click.echo(json.dumps([_full_dict(push) for push in pushes], indent=2))
        return
    if not pushes:
        click.echo("no pushes received yet")
    for push in pushes:
        mail = push.mail
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(push.ts))
        marker = " " if mail.seen else "*"
        click.echo(f"{marker} {when}  {push.kind:<6}  {mail.sender}  {mail.subject!r}")
        click.echo(f"  {'':<19}  id {mail.id}; {push.reason}")


@inbox.command("read")
@click.argument("mail_id")
@click.option("--unread", is_flag=True, help="Mark the mail unread instead.")
@common_options
@click.pass_context
def inbox_read(ctx: click.Context, mail_id: str, unread: bool) -> None:
    """Mark a mail read (or unread) here and on every other terminal and the mailbox.

    MAIL_ID is the id `mailpush-agent inbox` lists.
    """
    obj = _context(ctx)
    settings = obj.load()
    path = inbox_path(default_data_dir(), settings.user, settings.terminal)
    seen = not unread
    with Inbox(path) as store:
        if store.get(mail_id) is None:
            raise MailpushError(
                f"{mail_id}: no such mail in this terminal's inbox; see `mailpush-agent inbox`"
            )
        store.mark_read(mail_id, seen)

    status = MailStatus(mail=mail_id, seen=seen, by=settings.terminal, ts=round(time.time(), 3))
    topic = Topics(settings.broker.topic_root).mailstatus(settings.user)
    try:
        with BrokerSession(settings, "inbox") as session:
            session.publish(topic, encode(status))
    except BrokerError as exc:
        raise BrokerError(f"marked {'read' if seen else 'unread'} here only: {exc}") from None
    click.echo(f"{mail_id} marked {'read' if seen else 'unread'}")


def _full_dict(value: Any) -> Any:
    """Convert a message to JSON-ready data with every field, defaults included, for scripts."""
    if isinstance(value, msgspec.Struct):
        names = zip(value.__struct_fields__, value.__struct_encode_fields__, strict=True)
        data = {encoded: _full_dict(getattr(value, name)) for name, encoded in names}
        tag = value.__struct_config__.tag
        if tag is not None:
            data = {value.__struct_config__.tag_field: tag, **data}
        return data
    if isinstance(value, list):
        return [_full_dict(item) for item in value]
    return value


def _probe_sensors(
    plugins: dict[str, PluginEntry], settings: AgentConfig | None, include_disabled: bool = False
) -> dict[str, dict[str, Any]]:
    # The plugins log their problems at WARNING when they start, and the table
    # printed below shows the same reasons, so the log would only repeat them.
    sensors_log = logging.getLogger("mailpush.sensors")
    level = sensors_log.level
    sensors_log.setLevel(logging.ERROR)
    try:
        return _describe_plugins(plugins, settings, include_disabled)
    finally:
        sensors_log.setLevel(level)


def _describe_plugins(
    plugins: dict[str, PluginEntry], settings: AgentConfig | None, include_disabled: bool
) -> dict[str, dict[str, Any]]:
    described: dict[str, dict[str, Any]] = {}
    for name, entry in sorted(plugins.items()):
        setting = settings.sensors.get(name) if settings else None
        enabled = (
            setting.enabled if setting else bool(entry.plugin and entry.plugin.enabled_by_default)
        )
        if not enabled and not include_disabled:
            continue
        row: dict[str, Any] = {"enabled": enabled}
        if entry.plugin is None:
            row.update(health=Health.ERROR.value, reason=entry.error)
            described[name] = row
            continue

        plugin = entry.plugin(setting.options if setting else None)
        try:
            plugin.start(lambda: None)
            health = plugin.status()
            reading = plugin.read() if health.health in (Health.OK, Health.DEGRADED) else None
            row.update(health=health.health.value, reason=health.reason)
            if reading is not None:
                row["details"] = dict(reading.details)
        except Exception as exc:  # report a broken plugin; never crash the listing
            row.update(health=Health.ERROR.value, reason=str(exc))
        finally:
            plugin.stop()
        described[name] = row
    return described


def _print_sensors(described: dict[str, dict[str, Any]]) -> None:
    for name, row in described.items():
        flag = "" if row.get("enabled", True) else " (disabled)"
        reason = f": {row['reason']}" if row.get("reason") else ""
        click.echo(f"  {name:<12} {row['health']}{flag}{reason}")
        for key, value in (row.get("details") or {}).items():
            click.echo(f"  {'':<12}   {key}: {value}")


def _config_available(obj: _Context) -> bool:
    if obj.config_path is not None:
        return True
    if default_config_path().exists():
        return True
    return bool(obj.overrides.get("user") and obj.overrides.get("terminal"))


def _password_source(settings: AgentConfig) -> str | None:
    broker = settings.broker
    if broker.password_file:
        return f"file {broker.password_file}"
    if broker.password_env:
        return f"environment variable {broker.password_env}"
    if broker.password_command:
        return f"command {broker.password_command[0]}"
    return None


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> None:
    """Run the CLI; expected errors become one line on stderr and an exit code."""
    command.run(cli, "mailpush-agent")
