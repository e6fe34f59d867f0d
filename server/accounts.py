"""Mosquitto accounts for terminals and the push service: ``mailpush-server accounts``.

Each terminal gets its own broker account, named ``USER.TERMINAL``. A dot
cannot occur in an id, so the name is unambiguous and no two terminals share
one. ``accounts add`` writes a PBKDF2-SHA512 hash line in the ``$7$`` format of
Mosquitto 2.0's password file and a ``user`` block in its ACL file, and
writes the new password to a fresh file of mode 0600 for the agent. The
password never appears on a command line, in a log or on the screen.
"""

import base64
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click

from mailpush.errors import ConfigError
from mailpush.protocol.ids import validate_id
from mailpush.protocol.topics import DEFAULT_ROOT, Topics

DEFAULT_PASSWORD_FILE = Path("/etc/mosquitto/mailpush/passwords")
DEFAULT_ACL_FILE = Path("/etc/mosquitto/mailpush/acl")
DEFAULT_SERVICE_ACCOUNT = "mailpush-service"

# Mosquitto 2.0 password_mosq.h defines hash type 7 as PBKDF2-SHA512 with a
# 12-byte salt and a 64-byte digest. A line reads user:$7$ITERATIONS$SALT$DIGEST
# in standard base64. The password is 256 random bits, so the work factor does
# not protect it. 1,000 iterations keep each CONNECT cheap for the broker and
# stay above the default of 101 in mosquitto_passwd 2.0.
PBKDF2_ITERATIONS = 1000
SALT_BYTES = 12
PASSWORD_BYTES = 32


@dataclass(frozen=True)
class Account:
    """A broker account: its username, what the ACL grants it, and a description."""

    username: str
    acl_rules: list[str]
    description: str


def terminal_username(user: str, terminal: str) -> str:
    """Return the broker username of a terminal's agent: ``USER.TERMINAL``."""
    return f"{user}.{terminal}"


def terminal_account(user: str, terminal: str, root: str = DEFAULT_ROOT) -> Account:
    """Build the account of one terminal: its own topics, and its user's shared ones.

    The agent publishes its state, attributes and acks, reads its inbox and
    probes, publishes its user's policy and mail status, and reads the policy
    and every terminal's state and attributes of its user, which
    ``mailpush-agent policy show`` and ``explain`` need.
    """
    topics = Topics(root)
    own_terminals = f"{topics.root}/{user}/terminals/+"
    rules = [
        f"topic write {topics.state(user, terminal)}",
        f"topic write {topics.attributes(user, terminal)}",
        f"topic write {topics.ack(user, terminal)}",
        f"topic read {topics.inbox(user, terminal)}",
        f"topic read {topics.probe(user, terminal)}",
        f"topic readwrite {topics.policy(user)}",
        f"topic write {topics.mailstatus(user)}",
        f"topic read {own_terminals}/state",
        f"topic read {own_terminals}/attributes",
    ]
    return Account(terminal_username(user, terminal), rules, f"terminal {terminal} of user {user}")


def service_account(name: str = DEFAULT_SERVICE_ACCOUNT, root: str = DEFAULT_ROOT) -> Account:
    """Build the push service's account: it reads and writes every topic under ``root``."""
    return Account(name, [f"topic readwrite {root}/#"], "the mailpush push service")


def generate_password() -> str:
    """Return a new random password: 32 bytes from :mod:`secrets`, base64url without padding."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """Return the Mosquitto 2.0 ``$7$`` (PBKDF2-SHA512) hash of ``password``."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS)
    encoded_salt = base64.b64encode(salt).decode("ascii")
    encoded_digest = base64.b64encode(digest).decode("ascii")
    return f"$7${PBKDF2_ITERATIONS}${encoded_salt}${encoded_digest}"


def add_account(account: Account, password_file: Path, acl_file: Path, secret_file: Path) -> None:
    """Create the account in Mosquitto's files and write its password to ``secret_file``.

    Every check runs before the first write. The secret file comes first, so
    a failure there leaves the broker's files untouched.

    Raises:
        ConfigError: a file is missing, is readable by every user, the account
            exists already, or ``secret_file`` exists.
    """
    _check_broker_file(password_file, "--password-file")
    _check_broker_file(acl_file, "--acl-file")
    with _locked(password_file):
        _check_new_username(account.username, password_file, acl_file)
        password = generate_password()
        _write_secret(secret_file, password)
        _append(acl_file, _acl_block(account))
        _append(password_file, f"{account.username}:{hash_password(password)}\n")


def validate_topic_root(root: str) -> str:
    """Return ``root`` if it is a usable topic root, else raise :class:`ConfigError`."""
    levels = root.split("/")
    if not root or "" in levels or any(char in root for char in "+#\0 "):
        msg = f"--topic-root: invalid topic root {root!r}; use levels without +, #, spaces or empty levels, like {DEFAULT_ROOT}"
        raise ConfigError(msg)
    return root


def _check_broker_file(path: Path, option: str) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        msg = f"{option}: {path} not found; create it first: install -m 0640 -o root -g mosquitto /dev/null {path}"
        raise ConfigError(msg) from None
    except OSError as exc:
        msg = f"{option}: cannot read {path}: {exc.strerror}"
        raise ConfigError(msg) from None
    if not stat.S_ISREG(mode):
        msg = f"{option}: {path} is not a regular file"
        raise ConfigError(msg)
    if mode & stat.S_IRWXO:
        msg = f"{option}: {path} is accessible to every user; run chmod o-rwx {path}"
        raise ConfigError(msg)


def _check_new_username(username: str, password_file: Path, acl_file: Path) -> None:
    for line in _read_lines(password_file, "--password-file"):
        if line.split(":", 1)[0] == username:
            msg = f"account {username} already exists in {password_file}; remove its line there and its block in {acl_file} to create it again"
            raise ConfigError(msg)
    for line in _read_lines(acl_file, "--acl-file"):
        if line.split() == ["user", username]:
            msg = f"account {username} already has a block in {acl_file}; remove it to create the account again"
            raise ConfigError(msg)


def _read_lines(path: Path, option: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"{option}: cannot read {path}: {exc}"
        raise ConfigError(msg) from None


def _acl_block(account: Account) -> str:
    lines = [f"# {account.description}", f"user {account.username}", *account.acl_rules]
    return "\n" + "\n".join(lines) + "\n"


def _write_secret(path: Path, password: str) -> None:
    # O_EXCL: never overwrite a file, and never follow a symlink planted at the path.
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        msg = f"--secret-file: {path} exists already; give a new path or remove the old file"
        raise ConfigError(msg) from None
    except OSError as exc:
        msg = f"--secret-file: cannot create {path}: {exc.strerror}"
        raise ConfigError(msg) from None
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(password + "\n")


def _append(path: Path, text: str) -> None:
    # Appending in place keeps the file's owner, group and mode, which
    # Mosquitto needs to read it after it has dropped its root privileges.
    with path.open("a+", encoding="utf-8") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(handle.tell() - 1)
            if handle.read(1) != "\n":
                handle.write("\n")
        handle.write(text)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``, so two ``accounts add`` runs do not interleave."""
    import fcntl  # POSIX only, so imported here: the CLI must still load on Windows.

    with path.open("a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- command line

password_file_option = click.option(
    "--password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_PASSWORD_FILE,
    show_default=True,
    help="Mosquitto's password_file; the account's hash line is appended.",
)
acl_file_option = click.option(
    "--acl-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_ACL_FILE,
    show_default=True,
    help="Mosquitto's acl_file; the account's user block is appended.",
)
secret_file_option = click.option(
    "--secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="New file (mode 0600) that receives the password. Default: USERNAME.password here.",
)
topic_root_option = click.option(
    "--topic-root",
    default=DEFAULT_ROOT,
    show_default=True,
    help="Topic root the ACL entries cover, as broker.topic_root in the configs.",
)


# NOTE: there is no command to remove an account or change its password yet;
# docs/security.md gives the manual steps.
@click.group()
def accounts() -> None:
    """Create Mosquitto accounts for agents and the push service."""


@accounts.command("add")
@click.argument("user")
@click.argument("terminal")
@password_file_option
@acl_file_option
@secret_file_option
@topic_root_option
def accounts_add(
    user: str,
    terminal: str,
    password_file: Path,
    acl_file: Path,
    secret_file: Path | None,
    topic_root: str,
) -> None:
    """Create the broker account of one terminal, USER.TERMINAL, and print its agent config."""
    account = terminal_account(
        validate_id(user, "USER"),
        validate_id(terminal, "TERMINAL"),
        validate_topic_root(topic_root),
    )
    secret = _create(account, password_file, acl_file, secret_file)
    click.echo(f"# Copy {secret} to terminal {terminal}, chmod 600, and add to its agent.toml:")
    _echo_broker_table(account.username, secret, topic_root)


@accounts.command("add-service")
@click.argument("name", default=DEFAULT_SERVICE_ACCOUNT)
@password_file_option
@acl_file_option
@secret_file_option
@topic_root_option
def accounts_add_service(
    name: str, password_file: Path, acl_file: Path, secret_file: Path | None, topic_root: str
) -> None:
    """Create the push service's broker account NAME and print its server config."""
    account = service_account(validate_id(name, "NAME"), validate_topic_root(topic_root))
    secret = _create(account, password_file, acl_file, secret_file)
    click.echo(f"# Keep {secret} readable by the service's user only, and add to server.toml:")
    _echo_broker_table(account.username, secret, topic_root)


def _create(
    account: Account, password_file: Path, acl_file: Path, secret_file: Path | None
) -> Path:
    secret = (secret_file or Path(f"{account.username}.password")).absolute()
    add_account(account, password_file, acl_file, secret)
    click.echo(
        f"# Account {account.username} added to {password_file} and {acl_file}; "
        "reload Mosquitto to apply it (systemctl reload mosquitto)."
    )
    return secret


def _echo_broker_table(username: str, secret: Path, topic_root: str) -> None:
    click.echo("# Put this [broker] table in place of the one in the config file; copy the")
    click.echo("# password file to the terminal (mode 0600) and fix its path below.")
    click.echo("[broker]")
    click.echo('url = "mqtts://BROKER-HOST:8883"')
    # A JSON string is a valid TOML basic string, escapes included.
    click.echo(f"username = {json.dumps(username)}")
    click.echo(f"password_file = {json.dumps(str(secret))}")
    click.echo('ca_file = "/path/to/ca.pem"   # the CA that signed the broker\'s certificate')
    if topic_root != DEFAULT_ROOT:
        click.echo(f"topic_root = {json.dumps(topic_root)}")
