"""The push policy: the default, validation, and its wire and local TOML forms.

The routing decision itself lives in :mod:`mailpush.protocol.decision`. Its
public names are re-exported here so that callers import one module.
"""

from collections.abc import Mapping
from typing import Any

import msgspec

from mailpush.errors import ConfigError, PayloadError
from mailpush.protocol.decision import (
    CAPABILITIES,
    Decision,
    RuleTrace,
    TerminalView,
    decide,
    decision_to_dict,
    explain,
    parse_select,
    quote_name,
)
from mailpush.protocol.messages import Match, Policy, Rule, decode

__all__ = [
    "DEFAULT_POLICY",
    "Decision",
    "RuleTrace",
    "TerminalView",
    "decide",
    "decision_to_dict",
    "explain",
    "parse_policy_bytes",
    "policy_from_toml_dict",
    "policy_to_toml_dict",
    "validate_policy",
]

DEFAULT_POLICY = Policy(
    updated=0.0,
    set_by="",  # empty: built in, not set from any terminal
    rules=[Rule(name="default", select="most-active", prompt_others=True)],
    fallback="all",
)

# The keys a local policy file may use; anything else is a typo worth reporting.
_TOP_KEYS = ("fallback", "rules")
_RULE_KEYS = ("name", "match", "require", "select", "prompt_others")
_MATCH_KEYS = ("has_images", "has_attachments", "from", "subject", "min_size")


# ---------------------------------------------------------------- validation


def validate_policy(policy: Policy) -> Policy:
    """Check every rule of ``policy`` and return it unchanged.

    msgspec checks types only on decode, so this also checks the fields that
    a Policy built in Python could get wrong (``require``, ``fallback``).

    Raises:
        ConfigError: one line naming the rule (index and name), the field, the
            invalid value and the allowed values.
    """
    if policy.fallback not in ("all", "none"):
        msg = f"fallback: invalid value {policy.fallback!r}; use all or none"
        raise ConfigError(msg)

    seen: set[str] = set()
    for index, rule in enumerate(policy.rules):
        _validate_rule(index, rule, seen)
        seen.add(rule.name)
    return policy


def _validate_rule(index: int, rule: Rule, seen_names: set[str]) -> None:
    where = f"rules[{index}] {quote_name(rule.name)}"
    if not rule.name.strip():
        msg = f"rules[{index}]: name: missing or empty; give every rule a unique name"
        raise ConfigError(msg)
    if rule.name in seen_names:
        msg = f"{where}: name: duplicate name {rule.name!r}; give every rule a unique name"
        raise ConfigError(msg)

    parse_select(rule.select, where)

    _validate_require(where, rule.require)
    _validate_match(where, rule.match)


def _validate_require(where: str, require: object) -> None:
    allowed = f"use a list of {', '.join(CAPABILITIES)}"
    if not isinstance(require, list):
        msg = f"{where}: require: invalid value {require!r}; {allowed}"
        raise ConfigError(msg)

    for capability in require:
        if capability not in CAPABILITIES:
            msg = f"{where}: require: invalid value {capability!r}; {allowed}"
            raise ConfigError(msg)


def _validate_match(where: str, match: Match) -> None:
    for field, glob in (("from", match.sender), ("subject", match.subject)):
        if glob is None:
            continue
        problem = _glob_problem(glob)
        if problem:
            msg = f"{where}: match.{field}: invalid glob {glob!r}: {problem}"
            raise ConfigError(msg)

    if match.min_size is not None and match.min_size < 0:
        msg = f"{where}: match.min_size: invalid value {match.min_size!r}; use 0 or more bytes"
        raise ConfigError(msg)


def _glob_problem(glob: str) -> str:
    """Return what is wrong with ``glob`` as a sentence, or an empty string."""
    if not glob:
        return "it is empty; use * to match anything or remove the key"

    # fnmatch reads an unclosed '[' as a literal character, which is rarely what
    # the writer meant, so it is rejected. A literal '[' is written '[[]'.
    position = 0
    while position < len(glob):
        if glob[position] == "[":
            # As in fnmatch, a ']' right after '[' or '[!' is a member, not the end.
            first = position + 1
            if glob[first : first + 1] == "!":
                first += 1
            close = glob.find("]", first + 1)
            if close == -1:
                return "unclosed '['; close the set or write [[] for a literal '['"
            position = close
        position += 1
    return ""


# ---------------------------------------------------------------- wire and file forms


def parse_policy_bytes(payload: bytes) -> Policy:
    """Decode a Policy payload from the ``policy`` topic and validate it.

    Raises:
        PayloadError: the payload is not a valid Policy, including a rule that
            :func:`validate_policy` rejects, so a receiver drops it like any
            other bad payload.
    """
    policy = decode(payload, Policy)
    try:
        return validate_policy(policy)
    except ConfigError as exc:
        msg = f"Policy: invalid payload: {exc}"
        raise PayloadError(msg) from None


def policy_from_toml_dict(data: Mapping[str, Any], set_by: str, updated: float) -> Policy:
    """Build and validate a Policy from a parsed local TOML policy file.

    The file mirrors the Policy object: ``fallback = "all"`` and ``[[rules]]``
    tables with ``name``, ``match = {...}``, ``require = [...]``, ``select`` and
    ``prompt_others``. ``set_by`` and ``updated`` come from the caller.

    Raises:
        ConfigError: one line naming an unknown key, a wrong type or an invalid value.
    """
    _reject_unknown(data, _TOP_KEYS, "")
    rules_data = data.get("rules", [])
    if not isinstance(rules_data, list):
        msg = "rules: expected an array of [[rules]] tables"
        raise ConfigError(msg)

    rules = [_rule_from_toml(index, item) for index, item in enumerate(rules_data)]
    fallback = data.get("fallback", "all")
    policy = Policy(updated=updated, set_by=set_by, rules=rules, fallback=fallback)
    return validate_policy(policy)


def _rule_from_toml(index: int, item: object) -> Rule:
    if not isinstance(item, Mapping):
        msg = f"rules[{index}]: expected a table with name, select and optional match"
        raise ConfigError(msg)

    where = f"rules[{index}] {quote_name(str(item.get('name', '')))}"
    _reject_unknown(item, _RULE_KEYS, f"{where}: ")
    match = item.get("match", {})
    if isinstance(match, Mapping):
        _reject_unknown(match, _MATCH_KEYS, f"{where}: match.")

    for key in ("name", "select"):
        if key not in item:
            msg = f"{where}: {key}: missing; every rule needs a name and a select"
            raise ConfigError(msg)
    _validate_require(where, item.get("require", []))

    try:
        return msgspec.convert(item, Rule)
    except msgspec.ValidationError as exc:
        # msgspec words it as "Expected `bool`, got `str` - at `$.prompt_others`".
        problem, _, path = str(exc).partition(" - at ")
        field = path.strip("`").removeprefix("$.") or "rule"
        msg = f"{where}: {field}: {problem[:1].lower()}{problem[1:]}"
        raise ConfigError(msg) from None


def _reject_unknown(table: Mapping[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
    for key in table:
        if key not in allowed:
            msg = f"{prefix}{key}: unknown key; the allowed keys are {', '.join(allowed)}"
            raise ConfigError(msg)


def policy_to_toml_dict(policy: Policy) -> dict[str, Any]:
    """Return the local TOML form of ``policy``, for ``tomli_w.dumps``.

    Unset match conditions are left out because TOML has no null.
    """
    rules = []
    for rule in policy.rules:
        match = {
            key: value
            for key, value in msgspec.to_builtins(rule.match).items()
            if value is not None
        }
        rules.append(
            {
                "name": rule.name,
                "match": match,
                "require": list(rule.require),
                "select": rule.select,
                "prompt_others": rule.prompt_others,
            }
        )
    return {"fallback": policy.fallback, "rules": rules}
