"""``mailpush-agent policy``: show, set, edit and explain the user's push policy.

The policy in force is the retained message on ``{root}/{user}/policy``; the
service validates it again and keeps the last good one. Every command talks
to the broker through a short-lived :class:`BrokerSession`.
"""

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import msgspec

from mailpush.agent.cli import _context, common_options
from mailpush.agent.config import AgentConfig
from mailpush.agent.oneshot import BrokerSession
from mailpush.agent.policy_file import (
    parse_policy_text,
    policy_path,
    preset_policy,
    read_policy_file,
    render_policy,
    save_policy_text,
)
from mailpush.agent.policy_inputs import (
    describe_view,
    mail_traits_from_eml,
    terminal_views,
    view_to_dict,
)
from mailpush.errors import ConfigError, PayloadError
from mailpush.protocol.decision import KINDS
from mailpush.protocol.messages import (
    Attachment,
    MailSummary,
    Policy,
    encode,
)
from mailpush.protocol.policy import (
    DEFAULT_POLICY,
    decide,
    decision_to_dict,
    explain,
    parse_policy_bytes,
)
from mailpush.protocol.topics import Topics

POLICY_WAIT_S = 3.0
TERMINALS_WAIT_S = 1.5
DEFAULT_STALE_AFTER_S = 180.0  # the service's default [service] stale_after_s


# ---------------------------------------------------------------- commands


@click.group()
@common_options
def policy() -> None:
    """Show, set, edit and explain the push policy of this user."""


@policy.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0.1),
    default=POLICY_WAIT_S,
    show_default=True,
    help="Seconds to wait for the retained policy.",
)
@common_options
@click.pass_context
def policy_show(ctx: click.Context, as_json: bool, wait_s: float) -> None:
    """Print the policy retained on the broker for the service: rules, fallback, who set it and when."""
    config = _context(ctx).load()
    with BrokerSession(config, "policy") as session:
        current = _fetch_policy(session, config, wait_s)

    if as_json:
        click.echo(json.dumps(_policy_json(current), indent=2))
        return
    if current is None:
        # NOTE: a broker restarted without persistence loses the retained policy. The service
        # still routes with the copy it stored, which this command cannot see.
        click.echo("no policy set; the service uses the default:")
        click.echo(render_policy(DEFAULT_POLICY, header=False))
        return
    click.echo(
        f"policy of {config.user}, set by {current.set_by} on {_local_time(current.updated)}:"
    )
    click.echo(render_policy(current, header=False))


@policy.command("set")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--most-active", "most_active", is_flag=True, help="To the terminal in use.")
@click.option(
    "--prefer",
    type=click.Choice(KINDS),
    help="To the terminals of this kind that are on, else to the terminal in use.",
)
@click.option(
    "--closest", is_flag=True, help="To the terminal closest to you, else the one in use."
)
@click.option("--all", "to_all", is_flag=True, help="To every terminal that is on.")
@click.option(
    "--to-terminal", "to_terminal", metavar="ID", help="To terminal ID, else the one in use."
)
@click.option(
    "--kinds",
    metavar="KIND+KIND",
    help="To every terminal of these kinds that is on (such as phone+laptop), else the one in use.",
)
@click.option(
    "--prompt-others/--no-prompt-others",
    default=None,
    help="Whether the other terminals that are on get a prompt (preset default: yes).",
)
@click.option(
    "--fallback",
    type=click.Choice(["all", "none"]),
    help="When no rule finds a terminal: all terminals, or none (preset default: all).",
)
@common_options
@click.pass_context
def policy_set(ctx: click.Context, file: Path | None, **presets: Any) -> None:
    """Publish the policy in FILE, or a preset, and save it as the local policy file."""
    prompt_others = presets.pop("prompt_others")
    fallback = presets.pop("fallback")
    chosen = {key: value for key, value in presets.items() if value}
    if file is not None and (chosen or prompt_others is not None or fallback is not None):
        raise click.UsageError("give either FILE or preset flags, not both")
    if file is None and len(chosen) != 1:
        raise click.UsageError(
            "give FILE or exactly one of --most-active, --prefer, --closest, --all, "
            "--to-terminal, --kinds"
        )

    config = _context(ctx).load()
    if file is not None:
        text = read_policy_file(file)
        new = parse_policy_text(text, str(file), config.terminal, time.time())
    else:
        option, value = next(iter(chosen.items()))
        flag = "--" + {"to_all": "all"}.get(option, option).replace("_", "-")
        select, name = _preset_select(option, value)
        built = preset_policy(select, name, prompt_others is not False, fallback or "all")
        text = render_policy(built)
        new = parse_policy_text(text, flag, config.terminal, time.time())

    with BrokerSession(config, "policy") as session:
        _publish(session, config, new, text)


@policy.command("edit")
@common_options
@click.pass_context
def policy_edit(ctx: click.Context) -> None:
    """Edit the policy in $EDITOR (or $VISUAL, else vi), check it, and publish it."""
    config = _context(ctx).load()
    local = policy_path(config)
    with BrokerSession(config, "policy") as session:
        current = _fetch_policy(session, config, POLICY_WAIT_S)
        initial = _initial_edit_text(local, current)
        editor = os.environ.get("EDITOR") or os.environ.get("VISUAL") or "vi"

        with tempfile.TemporaryDirectory(prefix="mailpush-policy-") as folder:
            draft = Path(folder) / "policy.toml"
            draft.write_text(initial, encoding="utf-8")
            while True:
                click.edit(filename=str(draft), editor=editor)
                text = draft.read_text(encoding="utf-8")
                if text == initial and current is not None:
                    click.echo("no changes; nothing was published")
                    return
                try:
                    new = parse_policy_text(text, "policy.toml", config.terminal, time.time())
                except ConfigError as exc:
                    click.echo(f"invalid policy: {exc}", err=True)
                    if _confirm_again():
                        continue
                    msg = "the policy in force stays as it was; nothing was published"
                    raise ConfigError(msg) from None
                _publish(session, config, new, text)
                return


def _confirm_again() -> bool:
    """Ask whether to edit again; no answer (stdin closed or not a terminal) means no."""
    try:
        return click.confirm("Edit it again?", default=True, err=True)
    except click.exceptions.Abort:
        click.echo("", err=True)
        return False


@policy.command("explain")
@click.option("--from", "sender", metavar="ADDRESS", help="The mail's From header.")
@click.option("--subject", help="The mail's subject.")
@click.option("--size", type=click.IntRange(min=0), help="The mail's size in bytes.")
@click.option("--images/--no-images", default=None, help="Whether the mail has images.")
@click.option(
    "--attachments/--no-attachments", default=None, help="Whether the mail has attachments."
)
@click.option(
    "--eml",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the traits from this RFC 5322 file; the options above override them.",
)
@click.option(
    "--stale-after",
    "stale_after_s",
    type=click.FloatRange(min=0),
    default=DEFAULT_STALE_AFTER_S,
    show_default=True,
    help="Seconds after which a state counts as unknown, as the service's stale_after_s.",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0.1),
    default=TERMINALS_WAIT_S,
    show_default=True,
    help="Seconds to collect the retained states and attributes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@common_options
@click.pass_context
def policy_explain(ctx: click.Context, **options: Any) -> None:
    """Show which terminals would get a mail now, and why, rule by rule."""
    config = _context(ctx).load()
    mail = _mail_from_options(options)
    topics = Topics(config.broker.topic_root)
    base = f"{topics.root}/{config.user}/terminals/+"
    with BrokerSession(config, "policy") as session:
        retained = session.collect(
            [f"{base}/state", f"{base}/attributes", topics.policy(config.user)],
            options["wait_s"],
        )

    current = _decode_policy(retained.get(topics.policy(config.user)))
    # NOTE: the service may probe terminals with old states before routing (report_mode).
    # explain does not, so for those terminals its decision can differ from the service's.
    now = time.time()
    views, dropped = terminal_views(topics, config.user, retained, now, options["stale_after_s"])
    for line in dropped:
        click.echo(f"ignored {line}", err=True)
    decision = decide(current or DEFAULT_POLICY, mail, views)

    if options["as_json"]:
        shown = {
            "mail": msgspec.to_builtins(mail),
            "policy": _policy_json(current),
            "terminals": [view_to_dict(view) for view in views],
            "decision": decision_to_dict(decision),
        }
        click.echo(json.dumps(shown, indent=2))
        return

    origin = (
        f"set by {current.set_by} on {_local_time(current.updated)}" if current else "the default"
    )
    stale_after_s = options["stale_after_s"]
    click.echo(f"Policy: {origin}")
    click.echo(f"Mail: {_describe_mail(mail)}")
    click.echo(f"Terminals (a state older than {stale_after_s:.0f} s counts as unknown):")
    for view in views:
        click.echo(f"  {describe_view(view, now)}")
    if not views:
        click.echo("  none: no terminal of this user has published a state or attributes")
    click.echo(explain(decision))


# ---------------------------------------------------------------- helpers


def _fetch_policy(session: BrokerSession, config: AgentConfig, wait_s: float) -> Policy | None:
    topic = Topics(config.broker.topic_root).policy(config.user)
    retained = session.collect([topic], wait_s, enough=lambda: topic in session.messages)
    return _decode_policy(retained.get(topic))


def _decode_policy(payload: bytes | None) -> Policy | None:
    """Decode the retained policy; None when there is none.

    Raises:
        PayloadError: the retained policy is invalid. The service rejected it
            too and routes with the last good policy it stored.
    """
    if payload is None:
        return None
    try:
        return parse_policy_bytes(payload)
    except PayloadError as exc:
        msg = (
            f"the retained policy is invalid ({exc}); the service keeps its last good policy. "
            "Replace it with `mailpush-agent policy set`"
        )
        raise PayloadError(msg) from None


def _publish(session: BrokerSession, config: AgentConfig, new: Policy, text: str) -> None:
    topic = Topics(config.broker.topic_root).policy(config.user)
    session.publish(topic, encode(new), retain=True)
    local = policy_path(config)
    save_policy_text(local, text)
    click.echo(
        f"published the policy of {config.user} ({len(new.rules)} rules, fallback {new.fallback}) "
        f"to {session.address}; saved it in {local}"
    )


def _preset_select(flag: str, value: Any) -> tuple[str, str]:
    """Return the ``select`` value and the rule name of a preset flag."""
    if flag == "most_active":
        return "most-active", "terminal in use"
    if flag == "closest":
        return "closest", "closest"
    if flag == "to_all":
        return "all", "all"
    if flag == "prefer":
        return f"prefer:{value}", f"prefer {value}"
    if flag == "to_terminal":
        return f"terminal:{value}", f"terminal {value}"
    return f"kinds:{value}", f"kinds {value}"


def _initial_edit_text(local: Path, current: Policy | None) -> str:
    """Return the draft to edit: the local file when it matches the policy in force.

    The local file keeps the user's comments, so it is preferred, but a policy
    set from another terminal is newer than it and wins.
    """
    if local.exists():
        text = read_policy_file(local)
        if current is None:
            return text
        try:
            mine = parse_policy_text(text, str(local), "", 0.0)
        except ConfigError:
            mine = None
        if mine is not None and (mine.rules, mine.fallback) == (current.rules, current.fallback):
            return text
    return render_policy(current or DEFAULT_POLICY)


def _mail_from_options(options: dict[str, Any]) -> MailSummary:
    traits: dict[str, Any] = {"sender": "", "subject": "", "size": 0, "has_images": False}
    attachments: list[Attachment] = []
    if options["eml"] is not None:
        summary = mail_traits_from_eml(options["eml"])
        traits.update(
            sender=summary.sender,
            subject=summary.subject,
            size=summary.size,
            has_images=summary.has_images,
        )
        attachments = list(summary.attachments)

    for option, key in (("sender", "sender"), ("subject", "subject"), ("size", "size")):
        if options[option] is not None:
            traits[key] = options[option]
    if options["images"] is not None:
        traits["has_images"] = options["images"]
    if options["attachments"] is True and not attachments:
        attachments = [
            Attachment(name="(given by --attachments)", type="application/octet-stream", size=0)
        ]
    elif options["attachments"] is False:
        attachments = []
    return MailSummary(id="explain", attachments=attachments, **traits)


def _describe_mail(mail: MailSummary) -> str:
    return (
        f"from {mail.sender or '(none)'}, subject {mail.subject!r}, {mail.size} bytes, "
        f"images {'yes' if mail.has_images else 'no'}, "
        f"attachments {len(mail.attachments) if mail.attachments else 'no'}"
    )


def _policy_json(current: Policy | None) -> dict[str, Any]:
    shown = current or DEFAULT_POLICY
    return {
        "source": "broker" if current is not None else "default",
        "updated_local": _local_time(current.updated) if current is not None else None,
        "policy": msgspec.to_builtins(shown),
    }


def _local_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))
