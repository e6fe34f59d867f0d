"""The routing decision: which terminals get a mail under a push policy.

For one mail, the first rule whose ``match`` holds and whose ``select`` finds
at least one terminal decides. If no rule does, the fallback does: ``all``
reaches every known terminal (off ones get the mail when they reconnect),
``none`` reaches nobody.

The module is pure: :func:`decide` reads only its arguments, so the agent's
``policy`` command and the push service give the same answer for the same input.

A terminal whose state is unknown (``TerminalView.state is None``, never
published or stale) is treated as not known to be on: no ``select`` picks it,
``terminal:ID`` included, and it gets no prompt. Only ``fallback = "all"``
reaches it.
"""

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Any, get_args

from mailpush.errors import ConfigError
from mailpush.protocol.ids import is_valid_id
from mailpush.protocol.messages import (
    STATES,
    Capability,
    DeviceKind,
    MailSummary,
    Match,
    Policy,
    Rule,
    StateName,
)

KINDS: tuple[str, ...] = get_args(DeviceKind)
CAPABILITIES: tuple[str, ...] = get_args(Capability)
IN_USE_STATES: tuple[StateName, ...] = ("active", "carried", "present")
SELECT_HELP = (
    "use most-active, closest, prefer:KIND, kinds:KIND+KIND, terminal:ID or all "
    f"(KIND is one of {', '.join(KINDS)})"
)


@dataclass(frozen=True)
class TerminalView:
    """The router's view of one terminal: its last state, attributes and position.

    Attributes:
        terminal: the terminal id.
        state: the last usage state, or None when unknown or stale.
        kind: the device kind from its attributes, or None before they arrive.
        capabilities: the capabilities from its attributes.
        proximity: ``position.proximity`` (0..1, 1 = the user is at it), or None.
        zone: ``position.zone``, or None.
        input_idle_s: seconds since the last input, or None when not sensed.
        ts: when the state was sensed (Unix seconds), or None.
    """

    terminal: str
    state: StateName | None
    kind: DeviceKind | None = None
    capabilities: frozenset[str] = frozenset()
    proximity: float | None = None
    zone: str | None = None
    input_idle_s: float | None = None
    ts: float | None = None


@dataclass(frozen=True)
class RuleTrace:
    """How one rule fared for one mail.

    Attributes:
        index: the rule's position in ``policy.rules``.
        name: the rule's name.
        matched: whether ``match`` held, or None when the rule was not checked
            because an earlier rule decided.
        candidates: the terminals that passed ``require``, sorted by id.
        selected: the terminals ``select`` picked from them, sorted by id.
        detail: in words, why the rule did not match, why ``select`` found
            nobody, or what it picked.
    """

    index: int
    name: str
    matched: bool | None
    candidates: tuple[str, ...]
    selected: tuple[str, ...]
    detail: str


@dataclass(frozen=True)
class Decision:
    """The routing decision for one mail.

    Attributes:
        deliver: the terminals that get the mail, sorted by id.
        prompt: the terminals that get a prompt naming ``deliver``, sorted by id.
        rule: the name of the deciding rule, or None when the fallback decided.
        reason: one sentence for a person, sent as the push's ``reason``.
        trace: one entry per rule of the policy, in order.
    """

    deliver: tuple[str, ...]
    prompt: tuple[str, ...]
    rule: str | None
    reason: str
    trace: tuple[RuleTrace, ...]


@dataclass(frozen=True)
class Selector:
    """A parsed ``select`` value of a policy rule."""

    mode: str  # most-active, closest, prefer, kinds, terminal or all
    kinds: tuple[str, ...] = ()
    terminal: str = ""


def parse_select(select: str, where: str) -> Selector:
    """Parse the ``select`` value of a rule.

    Args:
        select: the value, such as ``most-active`` or ``kinds:phone+laptop``.
        where: the rule as the error names it, such as ``rules[2] "photos"``.

    Raises:
        ConfigError: one line naming the rule, the invalid value and the allowed forms.
    """
    if select in ("most-active", "closest", "all"):
        return Selector(mode=select)

    mode, _, argument = select.partition(":")
    if mode == "prefer" and argument in KINDS:
        return Selector(mode="prefer", kinds=(argument,))
    if mode == "kinds":
        kinds = tuple(argument.split("+"))
        if all(kind in KINDS for kind in kinds) and len(set(kinds)) == len(kinds):
            return Selector(mode="kinds", kinds=kinds)
    if mode == "terminal" and is_valid_id(argument):
        return Selector(mode="terminal", terminal=argument)

    msg = f"{where}: select: invalid value {select!r}; {SELECT_HELP}"
    raise ConfigError(msg)


def quote_name(text: str) -> str:
    """Return ``text`` in double quotes, as rule names appear in messages."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped + '"'


def decide(policy: Policy, mail: MailSummary, terminals: Iterable[TerminalView]) -> Decision:
    """Decide which terminals get ``mail`` and which get a prompt.

    The result depends only on the set of terminals, never on their order:
    ties are broken by terminal id and every tuple is sorted by id.

    Args:
        policy: a policy that passed :func:`validate_policy`.
        mail: the mail to route.
        terminals: every terminal known for the user, each id once.

    Raises:
        ValueError: a terminal id appears twice in ``terminals``.
        ConfigError: a rule's ``select`` is invalid (the policy was not validated).
    """
    views = _index_terminals(terminals)
    traces: list[RuleTrace] = []
    winner: tuple[Rule, RuleTrace] | None = None

    for index, rule in enumerate(policy.rules):
        if winner is not None:
            skipped = f"not checked: rule {quote_name(winner[0].name)} decided first"
            traces.append(RuleTrace(index, rule.name, None, (), (), skipped))
            continue
        trace = _evaluate_rule(index, rule, mail, views)
        traces.append(trace)
        if trace.selected:
            winner = (rule, trace)

    if winner is None:
        return _decide_fallback(policy, views, tuple(traces))

    rule, trace = winner
    prompt: tuple[str, ...] = ()
    if rule.prompt_others:
        prompt = tuple(
            view.terminal
            for view in views.values()
            if view.terminal not in trace.selected and _is_on(view)
        )
    reason = f"rule {quote_name(rule.name)}: {trace.detail}"
    return Decision(trace.selected, prompt, rule.name, reason, tuple(traces))


def _index_terminals(terminals: Iterable[TerminalView]) -> dict[str, TerminalView]:
    """Return the views keyed by id, in id order."""
    views: dict[str, TerminalView] = {}
    for view in terminals:
        if view.terminal in views:
            msg = f"decide: terminal {view.terminal!r} appears twice; pass each terminal once"
            raise ValueError(msg)
        views[view.terminal] = view
    return dict(sorted(views.items()))


def _is_on(view: TerminalView) -> bool:
    """Return whether the terminal is known to be powered on and connected."""
    return view.state is not None and view.state != "off"


def _evaluate_rule(
    index: int, rule: Rule, mail: MailSummary, views: dict[str, TerminalView]
) -> RuleTrace:
    mismatch = _match_failure(rule.match, mail)
    if mismatch:
        return RuleTrace(index, rule.name, False, (), (), f"no match: {mismatch}")

    select = parse_select(rule.select, f"rules[{index}] {quote_name(rule.name)}")

    # require filters the candidates before select ranks them, so a nearer
    # terminal that cannot show the mail never hides one that can.
    required = frozenset(rule.require)
    candidates = [view for view in views.values() if required <= view.capabilities]
    picked, words = _SELECTORS[select.mode](select, candidates, views)

    label = rule.select
    if required:
        label += f" among terminals with {'+'.join(sorted(required))}"
    selected = tuple(sorted(view.terminal for view in picked))
    names = tuple(view.terminal for view in candidates)
    return RuleTrace(index, rule.name, True, names, selected, f"{label} {words}")


def _match_failure(match: Match, mail: MailSummary) -> str:
    """Return the first condition of ``match`` that ``mail`` fails, in words, or ''."""
    if match.has_images is not None and match.has_images != mail.has_images:
        return _flag_failure("has_images", match.has_images, "images")
    if match.has_attachments is not None and match.has_attachments != bool(mail.attachments):
        return _flag_failure("has_attachments", match.has_attachments, "attachments")

    if match.sender is not None:
        address = parseaddr(mail.sender)[1]
        if not any(_glob_matches(match.sender, text) for text in (address, mail.sender)):
            return f"the sender does not match from {match.sender!r}"
    if match.subject is not None and not _glob_matches(match.subject, mail.subject):
        return f"the subject does not match subject {match.subject!r}"

    if match.min_size is not None and mail.size < match.min_size:
        return f"the mail has {mail.size} bytes, fewer than min_size {match.min_size}"
    return ""


def _flag_failure(field: str, expected: bool, noun: str) -> str:
    if expected:
        return f"{field} is true but the mail has no {noun}"
    return f"{field} is false but the mail has {noun}"


def _glob_matches(glob: str, text: str) -> bool:
    # fnmatch.fnmatch folds case only on Windows (through os.path.normcase), so both
    # sides are lowered here and matched with fnmatchcase on every OS.
    return fnmatch.fnmatchcase(text.lower(), glob.lower())


Picked = tuple[list[TerminalView], str]


def _select_most_active(
    select: Selector, candidates: list[TerminalView], views: dict[str, TerminalView]
) -> Picked:
    in_use = [view for view in candidates if view.state in IN_USE_STATES]
    if not in_use:
        return [], "found no terminal in use (active, carried or present)"

    best = min(in_use, key=_activity_key)
    return [best], f"picked {best.terminal} ({best.state}, {_input_words(best.input_idle_s)})"


def _activity_key(view: TerminalView) -> tuple[int, bool, float, str]:
    """Sort key: most-in-use state, then most recent input (unknown last), then id."""
    rank = STATES.index(view.state) if view.state is not None else len(STATES)
    idle = view.input_idle_s
    return (rank, idle is None, idle if idle is not None else 0.0, view.terminal)


def _select_closest(
    select: Selector, candidates: list[TerminalView], views: dict[str, TerminalView]
) -> Picked:
    usable = [view for view in candidates if _is_on(view) and view.proximity is not None]
    if not usable:
        return [], "found no terminal that is on and reports a proximity"

    best = min(usable, key=lambda view: (-(view.proximity or 0.0), *_activity_key(view)))
    return [best], f"picked {best.terminal} (proximity {best.proximity:.2f})"


def _select_kinds(
    select: Selector, candidates: list[TerminalView], views: dict[str, TerminalView]
) -> Picked:
    # prefer:KIND and kinds:KIND+KIND differ only in how many kinds they name.
    picked = [view for view in candidates if view.kind in select.kinds and _is_on(view)]
    if not picked:
        return [], f"found no {' or '.join(select.kinds)} that is on"
    return picked, "picked " + ", ".join(view.terminal for view in picked)


def _select_terminal(
    select: Selector, candidates: list[TerminalView], views: dict[str, TerminalView]
) -> Picked:
    view = views.get(select.terminal)
    if view is None:
        return [], f"found no terminal {select.terminal}: it is not known"
    if view.state is None:
        return [], f"found no terminal {select.terminal}: its state is unknown"
    if view.state == "off":
        return [], f"found no terminal {select.terminal}: it is off"
    if view not in candidates:
        return [], f"found no terminal {select.terminal}: it lacks a required capability"
    return [view], f"picked {view.terminal} ({view.state})"


def _select_all(
    select: Selector, candidates: list[TerminalView], views: dict[str, TerminalView]
) -> Picked:
    picked = [view for view in candidates if _is_on(view)]
    if not picked:
        return [], "found no terminal that is on"
    return picked, "picked " + ", ".join(view.terminal for view in picked)


_SELECTORS = {
    "most-active": _select_most_active,
    "closest": _select_closest,
    "prefer": _select_kinds,
    "kinds": _select_kinds,
    "terminal": _select_terminal,
    "all": _select_all,
}


def _input_words(idle_s: float | None) -> str:
    if idle_s is None:
        return "no input reading"
    if idle_s < 1:
        return "input just now"
    if idle_s < 120:
        return f"input {idle_s:.0f} s ago"
    if idle_s < 7200:
        return f"input {idle_s / 60:.0f} min ago"
    return f"input {idle_s / 3600:.0f} h ago"


def _decide_fallback(
    policy: Policy, views: dict[str, TerminalView], traces: tuple[RuleTrace, ...]
) -> Decision:
    if not traces:
        cause = "the policy has no rules"
    elif not any(trace.matched for trace in traces):
        cause = "no rule matched the mail"
    else:
        cause = "no matching rule found a terminal"

    if policy.fallback == "none":
        reason = f"fallback none: {cause}, so no terminal gets the mail"
        return Decision((), (), None, reason, traces)

    # Off and unknown terminals are included: the outbox keeps the push until they reconnect.
    deliver = tuple(views)
    if not deliver:
        reason = f"fallback all: {cause}, and no terminal is known"
    elif len(deliver) == 1:
        reason = f"fallback all: {cause}, so the only known terminal, {deliver[0]}, gets the mail"
    else:
        reason = (
            f"fallback all: {cause}, so all {len(deliver)} known terminals get the mail "
            "(off ones when they reconnect)"
        )
    return Decision(deliver, (), None, reason, traces)


# ---------------------------------------------------------------- explanation


def explain(decision: Decision) -> str:
    """Return a multi-line explanation of ``decision`` for a person to read."""
    lines = [
        f"Mail goes to: {_names(decision.deliver)}",
        f"Prompt goes to: {_names(decision.prompt)}",
        f"Decided by: {decision.reason}",
        "Rules, in order:" if decision.trace else "Rules: none",
    ]
    for trace in decision.trace:
        head = f"  rules[{trace.index}] {quote_name(trace.name)}: "
        if trace.matched:
            candidates = _names(trace.candidates)
            lines.append(f"{head}matched; candidates: {candidates}; {trace.detail}")
        else:
            lines.append(head + trace.detail)

    if decision.prompt:
        lines.append(
            f"The prompt tells {_names(decision.prompt)} that the mail went to "
            f"{_names(decision.deliver)}."
        )
    return "\n".join(lines)


def _names(terminals: tuple[str, ...]) -> str:
    return ", ".join(terminals) if terminals else "nobody"


def decision_to_dict(decision: Decision) -> dict[str, Any]:
    """Return ``decision`` as plain lists, strings and bools for JSON output."""
    return {
        "deliver": list(decision.deliver),
        "prompt": list(decision.prompt),
        "rule": decision.rule,
        "reason": decision.reason,
        "trace": [
            {
                "index": trace.index,
                "name": trace.name,
                "matched": trace.matched,
                "candidates": list(trace.candidates),
                "selected": list(trace.selected),
                "detail": trace.detail,
            }
            for trace in decision.trace
        ],
    }
