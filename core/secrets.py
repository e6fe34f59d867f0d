"""Secrets (broker and IMAP passwords) read from a file, an environment variable or a command.

A secret never comes from the command line, where other users can read it in
the process list, and it is never logged or shown.
"""

import os
import stat
import subprocess
from pathlib import Path

from mailpush.errors import ConfigError

REDACTED = "********"


class PasswordSources:
    """Mixin for a config table with ``password_file``, ``password_env`` and ``password_command``."""

    password_file: str | None
    password_env: str | None
    password_command: list[str] | None
    secret_key = "broker"

    def password(self) -> str | None:
        """Read the password from the one source that is set, or return None."""
        return read_secret(
            self.secret_key,
            file=self.password_file,
            env=self.password_env,
            command=self.password_command,
        )


def read_secret(
    key: str,
    *,
    file: str | None = None,
    env: str | None = None,
    command: list[str] | None = None,
) -> str | None:
    """Return the secret from the one source that is set, or None when none is.

    Args:
        key: the config table the sources belong to, named in errors (``broker``).
        file: a file holding the secret; one trailing newline is stripped.
        env: the name of an environment variable holding the secret.
        command: an argument list whose standard output is the secret (no shell).

    Raises:
        ConfigError: when more than one source is set, or the source cannot be read.
    """
    sources = [
        name for name, value in (("file", file), ("env", env), ("command", command)) if value
    ]
    if len(sources) > 1:
        msg = f"{key}: set only one of password_file, password_env, password_command"
        raise ConfigError(msg)
    if file:
        return _read_file(key, Path(file).expanduser())
    if env:
        value = os.environ.get(env)
        if value is None:
            msg = f"{key}.password_env: environment variable {env} is not set; export it or use password_file"
            raise ConfigError(msg)
        return value
    if command:
        return _run_command(key, command)
    return None


def _read_file(key: str, path: Path) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        msg = f"{key}.password_file: {path} not found; create it or fix the path"
        raise ConfigError(msg) from None
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"{key}.password_file: cannot read {path}: {exc}"
        raise ConfigError(msg) from None

    # Group access is allowed, so a service user in the file's group can read it
    # (root:mailpush 0640); access for every other user is not.
    if mode & stat.S_IRWXO:
        msg = f"{key}.password_file: {path} is readable by other users; run chmod 600 {path}"
        raise ConfigError(msg)
    return text[:-1] if text.endswith("\n") else text


def _run_command(key: str, command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        msg = f"{key}.password_command: {command[0]} failed: {exc}"
        raise ConfigError(msg) from None
    if result.returncode != 0:
        msg = f"{key}.password_command: {command[0]} exited with status {result.returncode}"
        raise ConfigError(msg)
    return result.stdout.rstrip("\n")
