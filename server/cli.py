"""The ``mailpush-server`` command line."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import click

from mailpush import __version__, command
from mailpush.errors import ConfigError, MailpushError
from mailpush.protocol.ids import is_valid_id
from mailpush.server.config import (
    MaildirMailbox,
    ServerConfig,
    default_config_path,
    load_config,
)
from mailpush.server.service import PushService

log = logging.getLogger("mailpush.server")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # amqtt logs every connection and packet at INFO and DEBUG, and imapclient
    # logs whole FETCH responses, mail bodies included, at DEBUG. Mail bodies
    # must never reach a log, so these stay at WARNING whatever --log-level is.
    for noisy in ("amqtt", "transitions", "imapclient"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # amqtt warns about undelivered messages and malformed CONNECTs (every MQTT 5
    # client's first try) as a matter of course; only its errors matter here.
    logging.getLogger("amqtt").setLevel(logging.ERROR)


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Config file to use. Default: {default_config_path()}; without it, the embedded defaults.",
)
broker_option = click.option(
    "--broker",
    help="Broker URL (mqtt://HOST:PORT or mqtts://HOST:PORT) instead of the embedded broker.",
)
log_level_option = click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="Least severe log messages to print.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mailpush-server")
def cli() -> None:
    """Watch mailboxes and push each new mail to the terminal its owner is using."""


@cli.command()
@config_option
@broker_option
@log_level_option
def start(config_path: Path | None, broker: str | None, log_level: str) -> None:
    """Run the push service in the foreground until Ctrl-C or SIGTERM."""
    _setup_logging(log_level)
    config = load_config(config_path, broker)
    _run_service(config)


@cli.command()
@config_option
@broker_option
@click.option("--terminal", help="Terminal id of this machine's agent. Default: the host name.")
@log_level_option
def demo(
    config_path: Path | None, broker: str | None, terminal: str | None, log_level: str
) -> None:
    """Run the service and this machine's agent together, on the embedded defaults."""
    _setup_logging(log_level)
    config = load_config(config_path, broker)
    user = config.users[0].id
    terminal = terminal or _host_terminal_id()
    address = str(config.address) if config.address else f"mqtt://{config.broker.listen}"

    service = PushService(config)
    # The embedded broker speaks MQTT 3.1.1 only. Setting that in the agent's
    # config spares it the wait for an MQTT 5 CONNACK that never comes.
    protocol = "3.1.1" if config.embedded else "auto"
    agent_config = config.state_dir / "demo-agent.toml"
    agent_config.parent.mkdir(parents=True, exist_ok=True)
    agent_config.write_text(
        f'user = "{user}"\nterminal = "{terminal}"\n\n'
        f'[broker]\nurl = "{address}"\nprotocol = "{protocol}"\n',
        encoding="utf-8",
    )
    agent_command = [
        sys.executable, "-m", "mailpush.agent", "start", "--config", str(agent_config),
        "--log-level", log_level,
    ]  # fmt: skip
    agent: subprocess.Popen[bytes] | None = None

    def start_agent() -> None:
        nonlocal agent
        if not service.ready.wait(60):
            return
        env = dict(os.environ)
        agent = subprocess.Popen(agent_command, env=env)
        mailbox = config.users[0].mailbox
        where = mailbox.path if isinstance(mailbox, MaildirMailbox) else "the IMAP account"
        scripts = Path(sys.executable).parent
        click.echo(
            f"\nmailpush demo: service, broker {address}, agent {user}/{terminal}, mail from {where}.\n"
            "In another terminal, drop in a mail and list what the agent received:\n"
            f"  {scripts / 'mailpush-server'} deliver --sample\n"
            f"  {scripts / 'mailpush-agent'} inbox --config {agent_config}\n"
            "Ctrl-C stops everything.\n",
            err=True,
        )

    def stop_agent() -> None:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()

    def stop_all() -> None:
        # The agent stops first, so it publishes its `off` state while the broker still runs.
        stop_agent()
        service.stop()

    threading.Thread(target=start_agent, name="demo-agent", daemon=True).start()
    try:
        _run_service(config, service, on_stop=lambda: threading.Thread(target=stop_all).start())
    finally:
        stop_agent()


@cli.command()
@click.argument("message", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--sample", is_flag=True, help="Deliver a generated sample mail instead of a file.")
@click.option("--user", help="Whose Maildir to deliver to. Default: the first user.")
@config_option
def deliver(message: Path | None, sample: bool, user: str | None, config_path: Path | None) -> None:
    """Deliver a mail file (RFC 5322, such as an .eml) into a user's local Maildir.

    This does what a mail server's delivery agent does: it writes the file
    to tmp/ and renames it into new/, so the watcher never sees half a mail.
    """
    if (message is None) == (not sample):
        raise click.UsageError("give a mail file or --sample, not both and not neither")
    config = load_config(config_path)
    target = _maildir_of(config, user)
    raw = _sample_mail() if sample else _read_mail(message)  # type: ignore[arg-type]

    unique = f"{time.time_ns()}.P{os.getpid()}.{socket.gethostname().replace('/', '_')}"
    temporary = target / "tmp" / unique
    for sub in ("cur", "new", "tmp"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    temporary.write_bytes(raw)
    os.replace(temporary, target / "new" / unique)
    click.echo(f"delivered {len(raw)} bytes to {target / 'new' / unique}")


@cli.group()
def config() -> None:
    """Inspect the service config."""


@config.command("show")
@config_option
@broker_option
def config_show(config_path: Path | None, broker: str | None) -> None:
    """Print the effective config after validation; secrets are never shown."""
    settings = load_config(config_path, broker)
    shown: dict[str, Any] = {
        "source": str(settings.source) if settings.source else "(embedded defaults)",
        "broker": str(settings.address)
        if settings.address
        else f"embedded on {settings.broker.listen}",
        "state_dir": str(settings.state_dir),
        "service": vars(settings.service),
        "users": [
            {
                "id": user.id,
                "report_mode": user.report_mode,
                "mailbox": _describe_mailbox(user.mailbox),
            }
            for user in settings.users
        ],
    }
    click.echo(json.dumps(shown, indent=2, default=str))


def _run_service(
    config: ServerConfig,
    service: PushService | None = None,
    on_stop: Callable[[], None] | None = None,
) -> None:
    service = service or PushService(config)

    def request_stop(signum: int, frame: object) -> None:
        if on_stop is not None:
            on_stop()
        else:
            service.stop()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    service.run()


def _maildir_of(config: ServerConfig, user: str | None) -> Path:
    users = {entry.id: entry for entry in config.users}
    entry = users.get(user) if user else config.users[0]
    if entry is None:
        raise ConfigError(f"--user: no user {user!r} in the config; users: {', '.join(users)}")
    if not isinstance(entry.mailbox, MaildirMailbox):
        raise ConfigError(
            f"--user: the mailbox of {entry.id} is IMAP; append mail with your mail client"
        )
    return entry.mailbox.path


def _read_mail(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MailpushError(f"{path}: cannot read the mail file: {exc.strerror}") from None
    if not raw.strip():
        raise MailpushError(
            f"{path}: the mail file is empty; give an RFC 5322 message such as an .eml"
        )
    return raw


def _sample_mail() -> bytes:
    message = EmailMessage()
    message["From"] = "mailpush demo <demo@example.org>"
    message["To"] = "you@example.org"
    message["Subject"] = f"Hello from mailpush at {time.strftime('%H:%M:%S')}"
    message["Date"] = format_datetime(datetime.now().astimezone())
    message["Message-ID"] = make_msgid(domain="mailpush.invalid")
    message.set_content("This sample mail was delivered by `mailpush-server deliver --sample`.\n")
    return bytes(message)


def _describe_mailbox(mailbox: object) -> dict[str, Any]:
    if isinstance(mailbox, MaildirMailbox):
        return {"kind": "maildir", "path": str(mailbox.path)}
    settings = dict(getattr(mailbox, "settings", {}))
    for key in ("password_file", "password_env", "password_command"):
        if key in settings:
            settings[key] = "(set)" if key == "password_command" else settings[key]
    return settings


def _host_terminal_id() -> str:
    name = socket.gethostname().split(".")[0].lower()
    name = "".join(ch if ch.isalnum() or ch in "_-" else "-" for ch in name).strip("-_")[:64]
    return name if is_valid_id(name) else "this-machine"


def main() -> None:
    """Run the CLI; expected errors become one line on stderr and an exit code."""
    command.run(cli, "mailpush-server")


from mailpush.server.accounts import accounts  # noqa: E402

cli.add_command(accounts)
