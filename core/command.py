"""The exit path shared by both command lines: expected errors become one line and a code."""

import sys

import click

from mailpush.errors import MailpushError


def run(group: click.Group, prog_name: str) -> None:
    """Run a click group; a :class:`MailpushError` becomes ``PROG: error: MESSAGE`` and its exit code.

    Click's own usage errors keep click's message and exit code 2, and Ctrl-C exits with 130.
    """
    try:
        group.main(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MailpushError as exc:
        click.echo(f"{prog_name}: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
