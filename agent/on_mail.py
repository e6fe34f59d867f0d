"""The ``on_mail`` command: a program run for every mail push, for headless terminals.

It runs without a shell, with the mail's sender, subject and ids in its
environment, so a Raspberry Pi can blink an LED or play a sound.
"""

import logging
import os
import subprocess
from collections.abc import Mapping

from mailpush.errors import ConfigError
from mailpush.protocol.messages import Push

logger = logging.getLogger(__name__)


def validate_on_mail(command: object) -> list[str] | None:
    """Return the ``on_mail`` command as a list, or raise :class:`ConfigError` in one line."""
    if command is None:
        return None
    if isinstance(command, list) and command and all(_valid_argument(part) for part in command):
        return [str(part) for part in command]

    msg = (
        f"receiver.on_mail: invalid command {command!r}; give a list of non-empty strings, "
        'program first, such as ["notify-send", "New mail"] (no shell is used)'
    )
    raise ConfigError(msg)


def _valid_argument(part: object) -> bool:
    return isinstance(part, str) and part != "" and "\0" not in part


def on_mail_environment(push: Push, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment of an ``on_mail`` command: ``base`` plus the mail's fields."""
    env = dict(os.environ if base is None else base)
    fields = {
        "MAILPUSH_FROM": push.mail.sender,
        "MAILPUSH_SUBJECT": push.mail.subject,
        "MAILPUSH_MAIL_ID": push.mail.id,
        "MAILPUSH_PUSH_ID": push.id,
        "MAILPUSH_KIND": push.kind,
    }
    # A NUL cannot be passed in an environment variable, so it is dropped.
    env.update({name: value.replace("\0", "") for name, value in fields.items()})
    return env


def run_on_mail(command: list[str], push: Push, timeout_s: float) -> None:
    """Run the ``on_mail`` command for one push and log a failure to start or finish in one line."""
    try:
        completed = subprocess.run(
            command,
            env=on_mail_environment(push),
            stdin=subprocess.DEVNULL,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        logger.warning(
            "on_mail: %s killed after %g s (push %s); make it finish sooner",
            command[0],
            timeout_s,
            push.id,
        )
        return
    except OSError as exc:
        logger.warning(
            "on_mail: cannot run %s: %s; fix receiver.on_mail", command[0], exc.strerror or exc
        )
        return

    if completed.returncode != 0:
        logger.warning(
            "on_mail: %s exited with status %d (push %s)", command[0], completed.returncode, push.id
        )
