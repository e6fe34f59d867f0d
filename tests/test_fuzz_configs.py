"""Fuzz both config files and the policy file: a bad value is one ConfigError line naming the key.

The strategies build valid-looking TOML documents from the config dataclasses
themselves, then apply one mutation (a dropped key, a wrong type, an unknown
key, a huge string, NUL, NaN) or damage the TOML text. ``bench/fuzz.py`` runs
the same targets for a million inputs.
"""

import dataclasses
import datetime
import math
import types
import typing
from typing import Any

import pytest
import tomli_w
from hypothesis import given
from hypothesis import strategies as st

from mailpush.agent import config as agent_config
from mailpush.agent.fusion import FusionConfig
from mailpush.agent.policy_file import parse_policy_text, render_policy
from mailpush.errors import ConfigError
from mailpush.protocol.ids import is_valid_id
from mailpush.protocol.policy import policy_from_toml_dict
from mailpush.sensors.registry import discover
from mailpush.server import config as server_config
from tests.test_fuzz_payloads import (
    CI_SETTINGS,
    IDS,
    RULE,
    Target,
    assert_one_line,
)

PLUGINS = discover()

# Wrong values of TOML's own types only, because a config file cannot hold a null.
WRONG_VALUES: list[Any] = [
    True, 0, -1, 1.5, 2**63 - 1, "x", "", "a\x00b", [], {}, [1, "a"], {"k": 1},
    datetime.date(2024, 1, 1), float("inf"), float("-inf"), "y" * 70_000, float("nan"),
]  # fmt: skip

NUMBERS = st.floats(width=64)
CA_FILES = st.text(max_size=20)
URLS = st.one_of(
    st.sampled_from(
        ["mqtt://127.0.0.1:1883", "mqtts://broker.example.org:8883", "mqtt://[::1]:1883",
         "mqtt://u:p@h:1", "http://h", "mqtt://h:99999", "mqtt://h/path", "mqtt://", ""]
    ),
    st.builds("mqtt://{}:{}".format, st.text(max_size=10), st.integers(-1, 70_000)),
)  # fmt: skip


def value_for(hint: Any) -> st.SearchStrategy[Any]:
    """Return TOML values that mostly fit ``hint``, a config dataclass field's type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(value_for(a) for a in typing.get_args(hint) if a is not type(None)))
    if origin is typing.Literal:
        return st.sampled_from([*typing.get_args(hint), "bogus"])
    if origin is list:
        return st.lists(value_for(typing.get_args(hint)[0]), max_size=3)
    if dataclasses.is_dataclass(hint):
        return table_for(hint)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(min_value=-(2**63), max_value=2**63 - 1)
    if hint is float:
        return st.one_of(st.integers(-10, 100_000), NUMBERS)
    return st.text(max_size=20)


def table_for(cls: type, **overrides: st.SearchStrategy[Any]) -> st.SearchStrategy[dict]:
    """Return tables holding any subset of the dataclass's keys."""
    hints = typing.get_type_hints(cls)
    optional = {
        field.name: overrides.get(field.name, value_for(hints[field.name]))
        for field in dataclasses.fields(cls)
        if field.init
    }
    return st.fixed_dictionaries({}, optional=optional)


SENSORS = st.fixed_dictionaries(
    {},
    optional={
        name: table_for(entry.plugin.Options).map(lambda t: {**t, "enabled": False})
        | table_for(entry.plugin.Options)
        for name, entry in PLUGINS.items()
        if entry.plugin is not None
    },
)
AGENT_DOCUMENTS = st.fixed_dictionaries(
    {"user": IDS, "terminal": IDS},
    optional={
        "broker": table_for(agent_config.BrokerSettings, url=URLS, ca_file=CA_FILES),
        "fusion": table_for(FusionConfig).flatmap(
            lambda t: st.fixed_dictionaries({}, optional={"heartbeat_s": value_for(float)}).map(
                lambda h: {**t, **h}
            )
        ),
        "receiver": table_for(agent_config.ReceiverSettings),
        "position": table_for(agent_config.PositionSettings),
        "sensors": SENSORS,
    },
)

MAILBOXES = st.one_of(
    st.fixed_dictionaries(
        {"kind": st.just("maildir"), "path": st.sampled_from(["/tmp/Maildir", "~/Mail", ""])}
    ),
    st.fixed_dictionaries(
        {
            "kind": st.just("imap"),
            "host": st.sampled_from(["imap.example.org", ""]),
            "username": st.sampled_from(["alice", ""]),
        },
        optional={
            "port": st.integers(-1, 70_000),
            "tls": st.booleans(),
            "starttls": st.booleans(),
            "folder": st.text(max_size=10),
            "password_file": st.just("/etc/mailpush/alice"),
            "idle_renew_s": value_for(float),
            "poll_s": value_for(float),
            "timeout_s": value_for(float),
            "noop_every_s": value_for(float),
        },
    ),  # fmt: skip
    st.fixed_dictionaries({"kind": st.sampled_from(["pop3", "", 5])}),
)
SERVER_DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "broker": table_for(
            server_config.BrokerSettings,
            url=URLS,
            listen=st.sampled_from(["127.0.0.1:1883", "[::1]:1", "h:", ":1", "h:99999", "x"]),
        ),
        "service": table_for(server_config.ServiceSettings),
        "users": st.lists(
            st.fixed_dictionaries(
                {"id": IDS},
                optional={
                    "mailbox": MAILBOXES,
                    "report_mode": st.sampled_from(["timed", "probe", "both", "never"]),
                },
            ),
            max_size=3,
        ),
    },
)
POLICY_DOCUMENTS = st.fixed_dictionaries(
    {"rules": st.lists(RULE, max_size=4)},
    optional={"fallback": st.sampled_from(["all", "none", "some"])},
)


# ---------------------------------------------------------------- mutations


def _paths(table: dict) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for key, value in table.items():
        paths.append((key,))
        if isinstance(value, dict):
            paths.extend((key, *sub) for sub in _paths(value))
    return paths


@st.composite
def mutated(draw: st.DrawFn, documents: st.SearchStrategy[dict]) -> dict:
    """Draw a document and apply at most one mutation to one of its keys."""
    document = draw(documents)
    paths = _paths(document)
    mutation = draw(st.sampled_from(["none", "drop", "wrong", "unknown", "nul"]))
    if mutation == "none" or not paths:
        return document

    path = draw(st.sampled_from(paths))
    table = document
    for key in path[:-1]:
        table = table[key]
    if mutation == "drop":
        del table[path[-1]]
    elif mutation == "wrong":
        table[path[-1]] = draw(st.sampled_from(WRONG_VALUES))
    elif mutation == "unknown":
        table[draw(st.sampled_from(["colour", "", "a.b", "user\x00"]))] = 1
    elif mutation == "nul":
        table[path[-1]] = "a\x00" + draw(st.text(max_size=5))
    return document


def _no_nan(value: object) -> bool:
    """Return whether no float field of a config dataclass is NaN (inf means "never")."""
    if isinstance(value, float):
        return not math.isnan(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(_no_nan(getattr(value, f.name)) for f in dataclasses.fields(value))
    return True


# ---------------------------------------------------------------- properties


def check_agent_config(document: dict) -> None:
    """Assert that an agent config is accepted with valid ids and numbers, or one ConfigError line."""
    try:
        config = agent_config.build_config(document, PLUGINS)
    except ConfigError as exc:
        assert_one_line(str(exc))
        assert exc.exit_code == 2
        return

    assert is_valid_id(config.user)
    assert is_valid_id(config.terminal)
    assert config.heartbeat_s >= 1, f"heartbeat_s {config.heartbeat_s} accepted"
    assert _no_nan(config.fusion), f"NaN fusion threshold accepted: {config.fusion}"


def check_server_config(document: dict) -> None:
    """Assert that a server config is accepted with valid ids and numbers, or one ConfigError line."""
    try:
        config = server_config.build_config(document)
    except ConfigError as exc:
        assert_one_line(str(exc))
        assert exc.exit_code == 2
        return

    assert all(is_valid_id(user.id) for user in config.users)
    assert len({user.id for user in config.users}) == len(config.users)
    assert _no_nan(config.service), f"NaN timing accepted: {config.service}"


def check_policy_dict(document: dict) -> None:
    """Assert that a policy table is a valid Policy that renders and parses back, or one line."""
    try:
        policy = policy_from_toml_dict(document, set_by="desk", updated=1.0)
    except ConfigError as exc:
        assert_one_line(str(exc))
        return

    text = render_policy(policy)
    assert parse_policy_text(text, "policy.toml", "desk", 1.0) == policy


@st.composite
def policy_texts(draw: st.DrawFn) -> str:
    """Draw a policy file: valid-looking TOML, now and then cut, with a character inserted, or random."""
    document = draw(mutated(POLICY_DOCUMENTS))
    try:
        text = tomli_w.dumps(document)
    except (TypeError, ValueError):  # a value TOML cannot hold, such as a NUL key
        text = str(document)
    damage = draw(st.sampled_from(["none", "none", "cut", "insert", "random"]))
    if damage == "random":
        return draw(st.text(max_size=200))
    position = draw(st.integers(min_value=0, max_value=len(text)))
    if damage == "cut":
        return text[:position]
    if damage == "insert":
        return (
            text[:position]
            + draw(st.sampled_from(['"', "[", "]]", "=", "\x00", "\n"]))
            + text[position:]
        )
    return text


def check_policy_text(text: str) -> None:
    """Assert that a policy file parses or is rejected in one line starting with its name."""
    try:
        policy = parse_policy_text(text, "policy.toml", "desk", 1.0)
    except ConfigError as exc:
        assert_one_line(str(exc), "policy.toml: ")
        return

    assert policy.set_by == "desk"
    assert parse_policy_text(render_policy(policy), "policy.toml", "desk", 1.0) == policy


TARGETS = [
    Target("agent build_config", mutated(AGENT_DOCUMENTS), check_agent_config),
    Target("server build_config", mutated(SERVER_DOCUMENTS), check_server_config),
    Target("policy_from_toml_dict", mutated(POLICY_DOCUMENTS), check_policy_dict),
    Target("parse_policy_text", policy_texts(), check_policy_text),
]


# ---------------------------------------------------------------- the CI run


@pytest.mark.parametrize("target", TARGETS, ids=[target.name for target in TARGETS])
def test_config_target_holds(target: Target) -> None:
    @CI_SETTINGS
    @given(target.strategy)
    def run(document: Any) -> None:
        target.check(document)

    run()


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({"user": "alice", "terminal": "desk", "broker": {"keepalive_s": "60"}}, "broker.keepalive_s"),
        ({"user": "alice", "terminal": "desk", "fusion": {"heartbeat_s": "often"}}, "fusion.heartbeat_s"),
        ({"user": "alice", "terminal": "desk", "sensors": {"input": {"backend": 1}}}, "sensors.input.backend"),
        ({"user": "alice", "terminal": "desk", "colour": "red"}, "colour"),
    ],
)  # fmt: skip
def test_agent_rejection_names_key(document: dict, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        agent_config.build_config(document, PLUGINS)

    assert_one_line(str(caught.value), f"{key}: ")


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({"service": {"probe_timeout_ms": 1.5}}, "service.probe_timeout_ms"),
        ({"users": [{"id": "a", "mailbox": {"kind": "imap", "host": "h", "username": "u", "port": "143"}}]},
         "users[0].mailbox.port"),
        ({"users": [{"id": "a", "mailbox": {"kind": "maildir"}}]}, "users[0].mailbox.path"),
        ({"broker": {"listen": "nowhere"}}, "broker.listen"),
    ],
)  # fmt: skip
def test_server_rejection_names_key(document: dict, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        server_config.build_config(document)

    assert_one_line(str(caught.value), f"{key}: ")


def test_policy_text_nul_rejected() -> None:
    # TOML forbids a raw NUL, so tomllib rejects it before any rule is read.
    with pytest.raises(ConfigError) as caught:
        parse_policy_text('[[rules]]\nname = "a\x00"\nselect = "all"\n', "policy.toml", "d", 1.0)

    assert_one_line(str(caught.value), "policy.toml: invalid TOML")


def test_strategies_reach_acceptance() -> None:
    # Guards the strategies: a valid agent document drawn from them is accepted.
    document = {"user": "alice", "terminal": "desk", "sensors": {"input": {"backend": "auto"}}}

    config = agent_config.build_config(document, PLUGINS)

    assert config.user == "alice"
    assert config.sensors["input"].enabled
