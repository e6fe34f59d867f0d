"""What the ``policy`` commands read: terminals from retained messages, mail traits.

The router's view of each terminal comes from
:func:`mailpush.protocol.views.terminal_view`, which the service's registry
uses too. The agent must not import the service, so this module rebuilds the
traits of a mail that a policy matches on, as server/summary.py reads them.
Keep them in step with that module; tests/test_policy_cli.py checks the mail
traits against the service's summary.
"""

import dataclasses
import email
import email.policy
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

from mailpush.errors import ConfigError, PayloadError
from mailpush.protocol.messages import (
    Attachment,
    DeviceAttributes,
    MailSummary,
    UsageState,
    decode,
)
from mailpush.protocol.policy import TerminalView
from mailpush.protocol.topics import TopicKind, Topics
from mailpush.protocol.views import terminal_view

# The service's guard against a crafted mail whose MIME parts nest deeply enough to exhaust the stack.
MAX_DEPTH = 30


def terminal_views(
    topics: Topics, user: str, retained: dict[str, bytes], now: float, stale_after_s: float
) -> tuple[list[TerminalView], list[str]]:
    """Build the router's view of each terminal from its retained state and attributes.

    Each view comes from :func:`~mailpush.protocol.views.terminal_view`, as in
    the service's registry. A payload whose ids do not match its topic is dropped.

    Returns:
        The views sorted by terminal id, and one line per payload that was dropped.
    """
    states: dict[str, UsageState] = {}
    attributes: dict[str, DeviceAttributes] = {}
    dropped: list[str] = []
    for topic, payload in retained.items():
        ref = topics.parse(topic)
        if ref is None or ref.user != user or ref.terminal is None:
            continue
        try:
            if ref.kind is TopicKind.STATE:
                state = decode(payload, UsageState)
                if (state.user, state.terminal) != (user, ref.terminal):
                    dropped.append(f"{topic}: the user or terminal does not match the topic")
                    continue
                states[ref.terminal] = state
            elif ref.kind is TopicKind.ATTRIBUTES:
                attributes[ref.terminal] = decode(payload, DeviceAttributes)
        except PayloadError as exc:
            dropped.append(f"{topic}: {exc}")

    views = []
    for terminal in sorted(set(states) | set(attributes)):
        views.append(
            terminal_view(
                terminal, states.get(terminal), attributes.get(terminal), now, stale_after_s
            )
        )
    return views, dropped


def describe_view(view: TerminalView, now: float) -> str:
    """Return one line for a person: the terminal, its state and what routing reads of it."""
    if view.state is not None:
        state = view.state
    elif view.ts is None:
        state = "unknown (no state published)"
    else:
        state = f"unknown (state {now - view.ts:.0f} s old)"
    words = [f"{view.terminal}: {state}", f"kind {view.kind or 'unknown'}"]
    words.append("capabilities " + ("+".join(sorted(view.capabilities)) or "none"))
    if view.input_idle_s is not None:
        words.append(f"input {view.input_idle_s:.0f} s ago")
    if view.proximity is not None:
        words.append(f"proximity {view.proximity:.2f}")
    if view.zone is not None:
        words.append(f"zone {view.zone}")
    return ", ".join(words)


def view_to_dict(view: TerminalView) -> dict[str, Any]:
    """Return ``view`` as plain values for JSON output."""
    shown = dataclasses.asdict(view)
    shown["capabilities"] = sorted(view.capabilities)
    return shown


# ---------------------------------------------------------------- mail traits


def mail_traits_from_eml(path: Path) -> MailSummary:
    """Read the traits a policy matches on from an RFC 5322 file.

    The rules follow the service's mail summary (server/summary.py): a mail has
    images when any non-multipart part is ``image/*``; an attachment is a part
    with ``Content-Disposition: attachment``, or a named part without a
    disposition; an attached message counts as one part and is not opened.

    Raises:
        ConfigError: the file cannot be read.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        msg = f"--eml: cannot read {path}: {exc.strerror or exc}"
        raise ConfigError(msg) from None

    message = email.message_from_bytes(raw, policy=email.policy.default)
    parts = list(_leaf_parts(message, 0))
    attachments = [
        Attachment(name=part.get_filename() or "", type=_content_type(part), size=0)
        for part in parts
        if _is_attachment(part)
    ]
    return MailSummary(
        id="explain",
        sender=_header(message, "from"),
        subject=_header(message, "subject"),
        size=len(raw),
        has_images=any(_content_type(part).startswith("image/") for part in parts),
        attachments=attachments,
    )


def _leaf_parts(part: Message, depth: int) -> Iterator[Message]:
    if depth > MAX_DEPTH:
        return
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        for child in part.get_payload():
            if isinstance(child, Message):
                yield from _leaf_parts(child, depth + 1)
    else:
        yield part


def _is_attachment(part: Message) -> bool:
    disposition = part.get_content_disposition()
    if disposition == "attachment":
        return True
    return disposition is None and part.get_filename() is not None and not part.is_multipart()


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:  # malformed MIME headers; the service treats them the same way
        return "application/octet-stream"


def _header(message: Message, name: str) -> str:
    try:
        value = message.get(name)
    except Exception:  # a header that policy.default cannot decode is left empty
        return ""
    return " ".join(str(value).split()) if value is not None else ""
