"""The local policy file, ``policy.toml`` beside ``agent.toml``, and the preset policies.

The file mirrors the protocol's Policy object field for field: ``fallback``
and ``[[rules]]`` tables with ``name``, ``match``, ``require``, ``select`` and
``prompt_others``. ``updated`` and ``set_by`` are not in the file, because
``mailpush-agent policy set`` stamps them when it publishes.
"""

import os
import tomllib
from pathlib import Path

import tomli_w

from mailpush.agent.config import AgentConfig, default_config_path
from mailpush.errors import ConfigError
from mailpush.protocol.messages import Match, Policy, Rule
from mailpush.protocol.policy import policy_from_toml_dict, policy_to_toml_dict

POLICY_FILE_NAME = "policy.toml"

FILE_HEADER = """\
# mailpush push policy. The first rule whose match holds and whose select finds a
# terminal decides; when none does, fallback does ("all" or "none").
# select: most-active, closest, prefer:KIND, kinds:KIND+KIND, terminal:ID or all.
# match (all optional): has_images, has_attachments, from, subject (globs), min_size.
# require: capabilities a chosen terminal must have (images, attachments, html, sound, color).
"""

# The rule every preset but --most-active and --all ends with, so that a mail
# still reaches the terminal in use when the preferred terminals are all off.
IN_USE_RULE_NAME = "terminal in use"


def policy_path(config: AgentConfig) -> Path:
    """Return the local policy file: ``policy.toml`` in the folder of the agent's config file.

    Without a config file (``--user`` and ``--terminal`` given as flags), it is
    in the platform's config folder, where ``agent.toml`` would be.
    """
    folder = config.source.parent if config.source is not None else default_config_path().parent
    return folder / POLICY_FILE_NAME


def parse_policy_text(text: str, source: str, set_by: str, updated: float) -> Policy:
    """Parse and validate the text of a policy file.

    Args:
        text: the TOML document.
        source: the file name, as errors name it.
        set_by: the terminal publishing the policy.
        updated: when it is published, in Unix seconds.

    Raises:
        ConfigError: one line naming the file, then the rule, field, invalid value
            and the allowed values.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = f"{source}: invalid TOML: {exc}"
        raise ConfigError(msg) from None

    try:
        return policy_from_toml_dict(data, set_by=set_by, updated=updated)
    except ConfigError as exc:
        msg = f"{source}: {exc}"
        raise ConfigError(msg) from None


def read_policy_file(path: Path) -> str:
    """Return the text of a policy file.

    Raises:
        ConfigError: the file is missing or cannot be read.
    """
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        msg = (
            f"{path}: policy file not found; write one (see docs/policies.md) or use a preset flag"
        )
        raise ConfigError(msg) from None
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"{path}: cannot read the policy file: {exc}"
        raise ConfigError(msg) from None


def render_policy(policy: Policy, header: bool = True) -> str:
    """Return ``policy`` as the text of a policy file.

    Each rule is a ``[[rules]]`` table with ``match`` as an inline table, as
    users write it, and an empty ``match`` or ``require`` is left out. tomli_w
    formats every scalar, so strings are always escaped correctly. The keys of
    ``match`` (``from``, ``subject``...) are all bare keys, so they need no quoting.
    """
    data = policy_to_toml_dict(policy)
    chunks = [FILE_HEADER + "\n"] if header else []
    chunks.append(f"fallback = {_toml_value(data['fallback'])}\n")
    for rule in data["rules"]:
        chunks.append("\n[[rules]]\n")
        for key, value in rule.items():
            if key in ("match", "require") and not value:
                continue
            chunks.append(f"{key} = {_toml_value(value)}\n")
    return "".join(chunks)


def _toml_value(value: object) -> str:
    """Return ``value`` as one line of TOML; tables and arrays are written inline."""
    if isinstance(value, dict):
        pairs = ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items())
        return f"{{ {pairs} }}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return tomli_w.dumps({"value": value}).partition(" = ")[2].strip()


def save_policy_text(path: Path, text: str) -> None:
    """Write the local policy file atomically, so a crash never leaves half a file.

    Raises:
        ConfigError: the folder or the file cannot be written.
    """
    temporary = path.with_suffix(".toml.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        msg = f"{path}: cannot write the local policy file: {exc.strerror or exc}"
        raise ConfigError(msg) from None


def preset_policy(select: str, name: str, prompt_others: bool, fallback: str) -> Policy:
    """Build the policy of a ``policy set`` preset flag.

    A preset that can find nobody while some terminal is in use (``prefer``,
    ``kinds``, ``terminal``, ``closest``) is followed by a ``most-active``
    rule, so "to the notebook whenever it is on" means "else to the terminal
    in use", not "else the fallback".

    Args:
        select: the ``select`` value, such as ``prefer:laptop``.
        name: the rule's name, as push reasons quote it.
        prompt_others: whether the other terminals that are on get a prompt.
        fallback: ``all`` or ``none``.

    Returns:
        The policy with ``updated`` 0 and ``set_by`` empty; the caller stamps both.
    """
    rules = [Rule(name=name, match=Match(), select=select, prompt_others=prompt_others)]
    if select not in ("most-active", "all"):
        rules.append(
            Rule(
                name=IN_USE_RULE_NAME,
                match=Match(),
                select="most-active",
                prompt_others=prompt_others,
            )
        )
    return Policy(updated=0.0, set_by="", rules=rules, fallback=fallback)  # type: ignore[arg-type]
