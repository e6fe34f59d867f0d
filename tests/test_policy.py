"""Tests of the push policy: validation, file and wire forms, and the routing decision."""

import json
import tomllib

import msgspec
import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

from mailpush.errors import ConfigError, PayloadError
from mailpush.protocol.messages import (
    STATES,
    Attachment,
    MailSummary,
    Match,
    Policy,
    Rule,
    encode,
)
from mailpush.protocol.policy import (
    DEFAULT_POLICY,
    Decision,
    TerminalView,
    decide,
    decision_to_dict,
    explain,
    parse_policy_bytes,
    policy_from_toml_dict,
    policy_to_toml_dict,
    validate_policy,
)

KINDS = ("laptop", "desktop", "phone", "tablet", "pi", "other")
CAPABILITIES = ("images", "attachments", "html", "sound", "color")


def view(
    terminal: str,
    state: str | None = "idle",
    kind: str | None = "laptop",
    caps: tuple[str, ...] = (),
    proximity: float | None = None,
    idle: float | None = None,
) -> TerminalView:
    return TerminalView(
        terminal=terminal,
        state=state,  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        capabilities=frozenset(caps),
        proximity=proximity,
        zone=None,
        input_idle_s=idle,
        ts=1_700_000_000.0,
    )


def mail(**fields: object) -> MailSummary:
    return MailSummary(id="7-42", **fields)  # type: ignore[arg-type]


def rule(
    name: str,
    select: str,
    *,
    prompt_others: bool = False,
    require: tuple[str, ...] = (),
    **match: object,
) -> Rule:
    return Rule(
        name=name,
        match=Match(**match),  # type: ignore[arg-type]
        require=list(require),  # type: ignore[arg-type]
        select=select,
        prompt_others=prompt_others,
    )


def policy(*rules: Rule, fallback: str = "all") -> Policy:
    built = Policy(updated=1.0, set_by="desk", rules=list(rules), fallback=fallback)  # type: ignore[arg-type]
    return validate_policy(built)


def config_error(built: Policy) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_policy(built)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- default and validation


def test_default_policy_shape():
    assert validate_policy(DEFAULT_POLICY) is DEFAULT_POLICY
    assert len(DEFAULT_POLICY.rules) == 1
    only = DEFAULT_POLICY.rules[0]
    assert only.name == "default"
    assert only.select == "most-active"
    assert only.prompt_others is True
    assert DEFAULT_POLICY.fallback == "all"


def test_default_policy_picks_terminal_in_use():
    terminals = [view("desk", "active", "desktop", idle=3), view("phone", "idle", "phone")]
    decision = decide(DEFAULT_POLICY, mail(), terminals)
    assert decision.deliver == ("desk",)
    assert decision.prompt == ("phone",)
    assert decision.rule == "default"
    assert decision.reason == 'rule "default": most-active picked desk (active, input 3 s ago)'


def test_policy_without_rules_is_valid():
    assert policy().rules == []


@pytest.mark.parametrize(
    "select",
    [
        "most-active",
        "closest",
        "all",
        "prefer:laptop",
        "prefer:other",
        "kinds:phone",
        "kinds:phone+laptop+desktop",
        "terminal:desk",
        "terminal:pi-4_b",
    ],
)
def test_select_valid(select):
    assert policy(rule("r", select)).rules[0].select == select


@pytest.mark.parametrize(
    "select",
    [
        "",
        "ALL",
        "most active",
        "most-active:1",
        "closest:",
        "prefer:",
        "prefer:fridge",
        "prefer:laptop+phone",
        "kinds:",
        "kinds:phone+",
        "kinds:phone+phone",
        "kinds:phone+fridge",
        "terminal:",
        "terminal:Desk",
        "terminal:a/b",
        "terminal:-desk",
        "laptop",
    ],
)
def test_select_invalid(select):
    message = config_error(
        Policy(updated=0, set_by="", rules=[rule("ok", "all"), rule("photos", select)])
    )
    assert message.startswith('rules[1] "photos": select: invalid value ')
    assert repr(select) in message
    assert "most-active, closest, prefer:KIND, kinds:KIND+KIND, terminal:ID or all" in message


def test_select_error_message_exact():
    rules = [rule("a", "all"), rule("b", "all"), rule("photos", "prefer:fridge")]
    message = config_error(Policy(updated=0, set_by="", rules=rules))
    assert message == (
        "rules[2] \"photos\": select: invalid value 'prefer:fridge'; use most-active, closest, "
        "prefer:KIND, kinds:KIND+KIND, terminal:ID or all "
        "(KIND is one of laptop, desktop, phone, tablet, pi, other)"
    )


def test_rule_name_empty():
    message = config_error(Policy(updated=0, set_by="", rules=[rule("  ", "all")]))
    assert message.startswith("rules[0]: name: ")
    assert "empty" in message


def test_rule_name_duplicate():
    rules = [rule("home", "all"), rule("home", "closest")]
    message = config_error(Policy(updated=0, set_by="", rules=rules))
    assert message.startswith('rules[1] "home": name: duplicate')
    assert "unique" in message


def test_require_invalid():
    message = config_error(Policy(updated=0, set_by="", rules=[rule("r", "all", require=("fax",))]))
    assert message.startswith("rules[0] \"r\": require: invalid value 'fax'")
    assert "images, attachments, html, sound, color" in message


def test_fallback_invalid():
    message = config_error(Policy(updated=0, set_by="", rules=[], fallback="some"))  # type: ignore[arg-type]
    assert message == "fallback: invalid value 'some'; use all or none"


@pytest.mark.parametrize(
    ("field", "glob"),
    [("sender", ""), ("subject", ""), ("sender", "[abc"), ("subject", "x[!]")],
)
def test_glob_invalid(field, glob):
    message = config_error(Policy(updated=0, set_by="", rules=[rule("g", "all", **{field: glob})]))
    name = "from" if field == "sender" else "subject"
    assert message.startswith(f'rules[0] "g": match.{name}: invalid glob {glob!r}')


@pytest.mark.parametrize("glob", ["*", "*@example.org", "[[]list] *", "[!]]x", "report ??"])
def test_glob_valid(glob):
    assert policy(rule("g", "all", subject=glob)).rules[0].match.subject == glob


def test_min_size_negative():
    message = config_error(Policy(updated=0, set_by="", rules=[rule("big", "all", min_size=-1)]))
    assert message.startswith('rules[0] "big": match.min_size: invalid value -1')


# ---------------------------------------------------------------- wire form


def test_policy_bytes_round_trip():
    original = policy(rule("photos", "closest", require=("images",), has_images=True))
    assert parse_policy_bytes(encode(original)) == original


def test_policy_bytes_invalid_select():
    payload = encode(Policy(updated=0, set_by="", rules=[rule("photos", "prefer:fridge")]))
    with pytest.raises(PayloadError) as caught:
        parse_policy_bytes(payload)
    message = str(caught.value)
    assert message.startswith('Policy: invalid payload: rules[0] "photos": select: ')
    assert "\n" not in message


def test_policy_bytes_not_json():
    with pytest.raises(PayloadError):
        parse_policy_bytes(b"{not json")


# ---------------------------------------------------------------- local TOML form

SIX_CASES_TOML = """
fallback = "all"

[[rules]]
name = "photos"
match = { has_images = true }
require = ["images", "color"]
select = "closest"
prompt_others = true

[[rules]]
name = "bank"
match = { from = "*@bank.example", subject = "statement*", min_size = 1000 }
select = "kinds:phone+laptop+desktop"

[[rules]]
name = "notebook"
select = "prefer:laptop"
prompt_others = true

[[rules]]
name = "in use"
select = "most-active"
"""


def test_toml_file_parses():
    loaded = policy_from_toml_dict(tomllib.loads(SIX_CASES_TOML), set_by="desk", updated=5.0)
    assert [r.name for r in loaded.rules] == ["photos", "bank", "notebook", "in use"]
    assert loaded.set_by == "desk"
    assert loaded.updated == 5.0
    assert loaded.rules[0].require == ["images", "color"]
    assert loaded.rules[1].match.sender == "*@bank.example"
    assert loaded.rules[1].match.min_size == 1000
    assert loaded.rules[3].prompt_others is False


def test_toml_round_trip():
    loaded = policy_from_toml_dict(tomllib.loads(SIX_CASES_TOML), set_by="desk", updated=5.0)
    text = tomli_w.dumps(policy_to_toml_dict(loaded))
    again = policy_from_toml_dict(tomllib.loads(text), set_by="desk", updated=5.0)
    assert again == loaded
    assert 'from = "*@bank.example"' in text


def test_toml_empty_file_gives_fallback_only():
    loaded = policy_from_toml_dict({}, set_by="desk", updated=0.0)
    assert loaded.rules == []
    assert loaded.fallback == "all"


@pytest.mark.parametrize(
    ("data", "start"),
    [
        ({"fallbak": "all"}, "fallbak: unknown key"),
        (
            {"rules": [{"name": "r", "select": "all", "prompt": True}]},
            'rules[0] "r": prompt: unknown key',
        ),
        (
            {"rules": [{"name": "r", "select": "all", "match": {"sender": "x"}}]},
            'rules[0] "r": match.sender: unknown key',
        ),
    ],
)
def test_toml_unknown_key(data, start):
    with pytest.raises(ConfigError) as caught:
        policy_from_toml_dict(data, set_by="desk", updated=0.0)
    assert str(caught.value).startswith(start)
    assert "allowed keys are" in str(caught.value)


@pytest.mark.parametrize(
    ("rule_data", "start"),
    [
        (
            {"name": "r", "select": "all", "prompt_others": "yes"},
            'rules[0] "r": prompt_others: expected `bool`',
        ),
        (
            {"name": "r", "select": "all", "match": {"min_size": -5}},
            'rules[0] "r": match.min_size: ',
        ),
        (
            {"name": "r", "select": "all", "require": ["fax"]},
            "rules[0] \"r\": require: invalid value 'fax'",
        ),
        ({"name": "r"}, 'rules[0] "r": select: missing'),
        ({"select": "all"}, 'rules[0] "": name: missing'),
        ({"name": "r", "select": "prefer:fridge"}, 'rules[0] "r": select: invalid value'),
    ],
)
def test_toml_invalid_rule(rule_data, start):
    with pytest.raises(ConfigError) as caught:
        policy_from_toml_dict({"rules": [rule_data]}, set_by="desk", updated=0.0)
    message = str(caught.value)
    assert message.startswith(start)
    assert "\n" not in message


def test_toml_rules_not_array():
    with pytest.raises(ConfigError) as caught:
        policy_from_toml_dict({"rules": "all"}, set_by="desk", updated=0.0)
    assert str(caught.value).startswith("rules: expected an array")


# ---------------------------------------------------------------- select


@pytest.mark.parametrize(
    ("terminals", "expected"),
    [
        # The most-in-use state wins, whatever the input times.
        ([view("a", "present", idle=1), view("b", "active", idle=100)], ("b",)),
        ([view("a", "present", idle=1), view("b", "carried", idle=900)], ("b",)),
        # Equal states: the most recent input wins, unknown input ranks last.
        ([view("a", "active", idle=50), view("b", "active", idle=5)], ("b",)),
        ([view("a", "active", idle=None), view("b", "active", idle=500)], ("b",)),
        # Equal state and input: the smaller id wins.
        ([view("b", "active", idle=5), view("a", "active", idle=5)], ("a",)),
        # idle, away, off and unknown are never in use.
        ([view("a", "idle", idle=1), view("b", "present")], ("b",)),
    ],
)
def test_select_most_active(terminals, expected):
    decision = decide(policy(rule("r", "most-active")), mail(), terminals)
    assert decision.rule == "r"
    assert decision.deliver == expected


def test_most_active_ignores_not_in_use():
    terminals = [
        view(t, state, idle=1)
        for t, state in [("a", "idle"), ("b", "away"), ("c", "off"), ("d", None)]
    ]
    decision = decide(policy(rule("r", "most-active"), fallback="none"), mail(), terminals)
    assert decision.rule is None
    assert decision.deliver == ()
    assert (
        decision.trace[0].detail
        == "most-active found no terminal in use (active, carried or present)"
    )


@pytest.mark.parametrize(
    ("terminals", "expected"),
    [
        ([view("a", proximity=0.2), view("b", proximity=0.9)], ("b",)),
        # No proximity, off or unknown state: never closest.
        ([view("a", proximity=None), view("b", proximity=0.1)], ("b",)),
        ([view("a", "off", proximity=1.0), view("b", proximity=0.1)], ("b",)),
        ([view("a", None, proximity=1.0), view("b", proximity=0.1)], ("b",)),
        # Equal proximity: the more-in-use state wins, then the smaller id.
        ([view("a", "idle", proximity=0.5), view("b", "active", proximity=0.5)], ("b",)),
        ([view("b", proximity=0.5), view("a", proximity=0.5)], ("a",)),
    ],
)
def test_select_closest(terminals, expected):
    decision = decide(policy(rule("r", "closest")), mail(), terminals)
    assert decision.rule == "r"
    assert decision.deliver == expected


def test_closest_reason_names_proximity():
    decision = decide(policy(rule("near", "closest")), mail(), [view("p", proximity=0.8)])
    assert decision.reason == 'rule "near": closest picked p (proximity 0.80)'


TERMINALS = [
    view("nb", "idle", "laptop"),
    view("nb-old", "off", "laptop"),
    view("nb-new", None, "laptop"),
    view("desk", "away", "desktop"),
    view("phone", "carried", "phone"),
    view("tab", "present", "tablet"),
    view("nokind", "active", None),
]


@pytest.mark.parametrize(
    ("select", "expected"),
    [
        ("prefer:laptop", ("nb",)),
        ("prefer:desktop", ("desk",)),
        ("prefer:pi", None),
        ("kinds:phone+desktop", ("desk", "phone")),
        ("kinds:laptop+tablet", ("nb", "tab")),
        ("kinds:pi+other", None),
        ("terminal:desk", ("desk",)),
        ("terminal:nokind", ("nokind",)),
        ("terminal:nb-old", None),  # off
        ("terminal:nb-new", None),  # state unknown
        ("terminal:ghost", None),  # not known
        ("all", ("desk", "nb", "nokind", "phone", "tab")),
    ],
)
def test_select_by_kind_terminal_all(select, expected):
    decision = decide(policy(rule("r", select), fallback="none"), mail(), TERMINALS)
    if expected is None:
        assert decision.rule is None
        assert decision.deliver == ()
    else:
        assert decision.rule == "r"
        assert decision.deliver == expected


@pytest.mark.parametrize(
    ("target", "words"),
    [("nb-old", "it is off"), ("nb-new", "its state is unknown"), ("ghost", "it is not known")],
)
def test_terminal_select_says_why_not(target, words):
    decision = decide(policy(rule("r", f"terminal:{target}"), fallback="none"), mail(), TERMINALS)
    assert decision.trace[0].detail == f"terminal:{target} found no terminal {target}: {words}"


# ---------------------------------------------------------------- require


def test_require_filters_before_select():
    terminals = [
        view("bw", "active", "phone", idle=1),
        view("colour", "present", "phone", ("images", "color")),
    ]
    decision = decide(
        policy(rule("r", "most-active", require=("images", "color"))), mail(), terminals
    )
    assert decision.deliver == ("colour",)
    assert decision.trace[0].candidates == ("colour",)
    assert "among terminals with color+images" in decision.reason


def test_require_partial_capabilities_not_enough():
    terminals = [view("a", caps=("images",)), view("b", caps=("color",))]
    decision = decide(
        policy(rule("r", "all", require=("images", "color")), fallback="none"), mail(), terminals
    )
    assert decision.rule is None


def test_require_terminal_lacks_capability():
    decision = decide(
        policy(rule("r", "terminal:a", require=("sound",)), fallback="none"), mail(), [view("a")]
    )
    assert decision.deliver == ()
    assert decision.trace[0].detail.endswith("it lacks a required capability")


# ---------------------------------------------------------------- match

WITH_ALL = dict(
    sender="Alice Example <Alice@Example.ORG>",
    subject="Quarterly Report Q3",
    size=5000,
    has_images=True,
    attachments=[Attachment(name="q3.pdf", type="application/pdf", size=4000)],
)


@pytest.mark.parametrize(
    ("conditions", "mail_fields", "matches"),
    [
        ({"has_images": True}, {"has_images": True}, True),
        ({"has_images": True}, {"has_images": False}, False),
        ({"has_images": False}, {"has_images": False}, True),
        ({"has_images": False}, {"has_images": True}, False),
        ({"has_attachments": True}, {"attachments": WITH_ALL["attachments"]}, True),
        ({"has_attachments": True}, {}, False),
        ({"has_attachments": False}, {}, True),
        # from: against the address and the display form, case-insensitive.
        ({"sender": "*@example.org"}, {"sender": WITH_ALL["sender"]}, True),
        ({"sender": "alice@*"}, {"sender": WITH_ALL["sender"]}, True),
        ({"sender": "alice example *"}, {"sender": WITH_ALL["sender"]}, True),
        ({"sender": "*@bank.example"}, {"sender": WITH_ALL["sender"]}, False),
        ({"sender": "bob@example.org"}, {"sender": "bob@example.org"}, True),
        ({"subject": "*report*"}, {"subject": WITH_ALL["subject"]}, True),
        ({"subject": "report*"}, {"subject": WITH_ALL["subject"]}, False),
        ({"subject": "quarterly report q?"}, {"subject": WITH_ALL["subject"]}, True),
        ({"min_size": 5000}, {"size": 5000}, True),
        ({"min_size": 5001}, {"size": 5000}, False),
        ({}, {}, True),
        # Every condition that is set must hold.
        ({"has_images": True, "sender": "*@example.org", "min_size": 100}, WITH_ALL, True),
        ({"has_images": True, "sender": "*@example.org", "min_size": 9999}, WITH_ALL, False),
        ({"has_images": False, "sender": "*@example.org"}, WITH_ALL, False),
    ],
)
def test_match_conditions(conditions, mail_fields, matches):
    rules = policy(rule("m", "all", **conditions), fallback="none")
    decision = decide(rules, mail(**mail_fields), [view("a")])
    assert decision.trace[0].matched is matches
    assert decision.deliver == (("a",) if matches else ())


def test_match_failure_words():
    decision = decide(policy(rule("m", "all", has_images=True)), mail(), [view("a")])
    assert decision.trace[0].detail == "no match: has_images is true but the mail has no images"


# ---------------------------------------------------------------- rule order, fallback, prompts


def test_first_deciding_rule_wins():
    rules = policy(rule("none-on", "prefer:pi"), rule("second", "all"), rule("third", "closest"))
    decision = decide(rules, mail(), [view("a", proximity=1.0)])
    assert decision.rule == "second"
    assert [t.matched for t in decision.trace] == [True, True, None]
    assert decision.trace[0].selected == ()
    assert decision.trace[2].detail == 'not checked: rule "second" decided first'


def test_fallback_all_includes_off_and_unknown():
    terminals = [view("b", "off"), view("a", None), view("c", "away")]
    decision = decide(policy(rule("r", "most-active")), mail(), terminals)
    assert decision.rule is None
    assert decision.deliver == ("a", "b", "c")
    assert decision.prompt == ()
    assert decision.reason.startswith("fallback all: no matching rule found a terminal, so all 3")


def test_fallback_none_reaches_nobody():
    decision = decide(
        policy(rule("r", "most-active"), fallback="none"), mail(), [view("a", "idle")]
    )
    assert decision.deliver == ()
    assert decision.prompt == ()
    assert (
        decision.reason
        == "fallback none: no matching rule found a terminal, so no terminal gets the mail"
    )


@pytest.mark.parametrize(
    ("rules", "cause"),
    [
        ((), "the policy has no rules"),
        ((rule("r", "all", has_images=True),), "no rule matched the mail"),
    ],
)
def test_fallback_cause(rules, cause):
    decision = decide(policy(*rules), mail(), [view("a")])
    assert decision.reason.startswith(f"fallback all: {cause}, ")


def test_fallback_all_single_terminal():
    decision = decide(policy(), mail(), [view("nb", "off")])
    assert decision.deliver == ("nb",)
    assert decision.reason == (
        "fallback all: the policy has no rules, so the only known terminal, nb, gets the mail"
    )


def test_fallback_all_without_terminals():
    decision = decide(policy(), mail(), [])
    assert decision.deliver == ()
    assert decision.reason == "fallback all: the policy has no rules, and no terminal is known"


def test_prompt_others_skips_off_and_unknown():
    terminals = [
        view("a", "active", idle=1),
        view("b", "idle"),
        view("c", "off"),
        view("d", None),
        view("e", "away"),
    ]
    decision = decide(policy(rule("r", "most-active", prompt_others=True)), mail(), terminals)
    assert decision.deliver == ("a",)
    assert decision.prompt == ("b", "e")


def test_prompt_others_false_prompts_nobody():
    terminals = [view("a", "active"), view("b", "idle")]
    decision = decide(policy(rule("r", "most-active")), mail(), terminals)
    assert decision.prompt == ()


def test_duplicate_terminal_rejected():
    with pytest.raises(ValueError, match="'a' appears twice"):
        decide(DEFAULT_POLICY, mail(), [view("a"), view("a", "off")])


# ---------------------------------------------------------------- the six cases


def test_case_a_terminal_in_use():
    rules = policy(rule("in use", "most-active", prompt_others=True))
    terminals = [
        view("desk", "idle", "desktop", idle=400),
        view("nb", "active", "laptop", idle=2),
        view("phone", "present", "phone"),
    ]
    decision = decide(rules, mail(), terminals)
    assert decision.deliver == ("nb",)
    assert decision.prompt == ("desk", "phone")


@pytest.mark.parametrize(
    ("notebook_state", "expected", "deciding_rule"),
    [
        ("idle", ("nb",), "notebook"),
        ("away", ("nb",), "notebook"),
        ("off", ("phone",), "in use"),
        (None, ("phone",), "in use"),
    ],
)
def test_case_b_notebook_else_in_use(notebook_state, expected, deciding_rule):
    rules = policy(rule("notebook", "prefer:laptop"), rule("in use", "most-active"))
    terminals = [
        view("nb", notebook_state, "laptop"),
        view("phone", "carried", "phone"),
        view("desk", "idle", "desktop"),
    ]
    decision = decide(rules, mail(), terminals)
    assert decision.deliver == expected
    assert decision.rule == deciding_rule


@pytest.mark.parametrize(
    ("desk_state", "expected"), [("away", ("desk",)), ("off", ("a", "desk", "p"))]
)
def test_case_c_desktop_whenever_on(desk_state, expected):
    rules = policy(rule("desktop", "prefer:desktop"))
    terminals = [
        view("desk", desk_state, "desktop"),
        view("a", "active", "laptop"),
        view("p", "idle", "phone"),
    ]
    decision = decide(rules, mail(), terminals)
    assert decision.deliver == expected  # when the desktop is off, fallback all reaches everyone


@pytest.mark.parametrize(
    ("nb_state", "desk_state", "expected"),
    [
        ("active", "off", ("nb", "phone")),
        ("off", "idle", ("desk", "phone")),
        ("active", "idle", ("desk", "nb", "phone")),
    ],
)
def test_case_d_phone_and_notebook_or_desktop(nb_state, desk_state, expected):
    # One rule delivers to the phone plus whichever of notebook and desktop is on.
    # The select grammar has no "one of" form, so when both are on, both get it.
    rules = policy(rule("phone and computer", "kinds:phone+laptop+desktop"))
    terminals = [
        view("phone", "carried", "phone"),
        view("nb", nb_state, "laptop"),
        view("desk", desk_state, "desktop"),
        view("tab", "active", "tablet"),
    ]
    decision = decide(rules, mail(), terminals)
    assert decision.deliver == expected
    assert "tab" not in decision.deliver


def test_case_e_closest():
    rules = policy(rule("closest", "closest", prompt_others=True))
    terminals = [
        view("kitchen", "idle", "tablet", proximity=0.3),
        view("study", "idle", "desktop", proximity=0.95),
        view("pocket", "idle", "phone", proximity=None),
    ]
    decision = decide(rules, mail(), terminals)
    assert decision.deliver == ("study",)
    assert decision.prompt == ("kitchen", "pocket")


def test_case_f_photos_to_colour_screen():
    rules = policy(
        rule("photos", "closest", require=("images", "color"), prompt_others=True, has_images=True),
        rule("in use", "most-active", prompt_others=True),
    )
    terminals = [
        view("bw-near", "active", "phone", caps=(), proximity=0.9, idle=1),
        view("bw-far", "idle", "phone", caps=("sound",), proximity=0.1),
        view("colour", "idle", "phone", caps=("images", "color", "html"), proximity=0.4),
    ]
    photo = decide(rules, mail(has_images=True), terminals)
    assert photo.deliver == ("colour",)
    assert photo.prompt == ("bw-far", "bw-near")
    assert photo.rule == "photos"
    assert "colour" in photo.reason

    # A mail without images goes to the nearest one in use, which is black and white.
    text = decide(rules, mail(has_images=False), terminals)
    assert text.deliver == ("bw-near",)
    assert text.rule == "in use"


# ---------------------------------------------------------------- explanation


def test_explain_lists_rules_and_recipients():
    rules = policy(
        rule("photos", "closest", has_images=True),
        rule("in use", "most-active", prompt_others=True),
    )
    decision = decide(
        rules, mail(), [view("desk", "active", idle=3), view("phone", "idle", "phone")]
    )
    lines = explain(decision).splitlines()
    assert lines[0] == "Mail goes to: desk"
    assert lines[1] == "Prompt goes to: phone"
    assert lines[2] == 'Decided by: rule "in use": most-active picked desk (active, input 3 s ago)'
    assert 'rules[0] "photos": no match: has_images is true' in lines[4]
    assert 'rules[1] "in use": matched; candidates: desk, phone;' in lines[5]
    assert lines[-1] == "The prompt tells phone that the mail went to desk."


def test_explain_fallback_nobody():
    decision = decide(policy(fallback="none"), mail(), [view("a")])
    text = explain(decision)
    assert "Mail goes to: nobody" in text
    assert "Rules: none" in text


def test_decision_to_dict_is_json():
    decision = decide(DEFAULT_POLICY, mail(), [view("a", "active"), view("b", "off")])
    data = json.loads(json.dumps(decision_to_dict(decision)))
    assert data["deliver"] == ["a"]
    assert data["prompt"] == []
    assert data["rule"] == "default"
    assert data["trace"][0]["matched"] is True
    assert data["trace"][0]["candidates"] == ["a", "b"]


# ---------------------------------------------------------------- properties

IDS = ["a", "b", "c", "desk", "nb", "phone", "pi-1", "tab"]


@st.composite
def terminal_sets(draw: st.DrawFn) -> list[TerminalView]:
    ids = draw(st.lists(st.sampled_from(IDS), unique=True, max_size=len(IDS)))
    return [
        TerminalView(
            terminal=terminal,
            state=draw(st.sampled_from((*STATES, None))),
            kind=draw(st.sampled_from((*KINDS, None))),
            capabilities=frozenset(draw(st.sets(st.sampled_from(CAPABILITIES)))),
            proximity=draw(st.none() | st.floats(0.0, 1.0)),
            zone=None,
            input_idle_s=draw(st.none() | st.floats(0.0, 1e5)),
            ts=None,
        )
        for terminal in ids
    ]


SELECTS = st.one_of(
    st.sampled_from(["most-active", "closest", "all"]),
    st.sampled_from(KINDS).map(lambda kind: f"prefer:{kind}"),
    st.sets(st.sampled_from(KINDS), min_size=1).map(
        lambda kinds: "kinds:" + "+".join(sorted(kinds))
    ),
    st.sampled_from([*IDS, "ghost"]).map(lambda terminal: f"terminal:{terminal}"),
)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    count = draw(st.integers(0, 4))
    rules = [
        Rule(
            name=f"rule-{index}",
            match=Match(
                has_images=draw(st.none() | st.booleans()),
                has_attachments=draw(st.none() | st.booleans()),
                min_size=draw(st.none() | st.integers(0, 10_000)),
            ),
            require=sorted(draw(st.sets(st.sampled_from(CAPABILITIES), max_size=2))),
            select=draw(SELECTS),
            prompt_others=draw(st.booleans()),
        )
        for index in range(count)
    ]
    fallback = draw(st.sampled_from(["all", "none"]))
    return validate_policy(Policy(updated=0, set_by="", rules=rules, fallback=fallback))


MAILS = st.builds(
    lambda images, attached, size: mail(
        has_images=images,
        size=size,
        attachments=[Attachment(name="a.pdf", type="application/pdf", size=1)] if attached else [],
    ),
    st.booleans(),
    st.booleans(),
    st.integers(0, 20_000),
)


def is_on(terminal: TerminalView) -> bool:
    return terminal.state is not None and terminal.state != "off"


@settings(max_examples=300)
@given(policies(), MAILS, terminal_sets())
def test_property_select_never_picks_off(rules, message, terminals):
    decision = decide(rules, message, terminals)
    by_id = {t.terminal: t for t in terminals}
    if decision.rule is not None:
        assert decision.deliver
        assert all(is_on(by_id[t]) for t in decision.deliver)
    assert all(is_on(by_id[t]) for t in decision.prompt)
    assert not set(decision.prompt) & set(decision.deliver)


@settings(max_examples=300)
@given(policies(), MAILS, terminal_sets())
def test_property_fallback_all_reaches_someone(rules, message, terminals):
    decision = decide(msgspec.structs.replace(rules, fallback="all"), message, terminals)
    if terminals:
        assert decision.deliver
    if decision.rule is None:
        assert decision.deliver == tuple(sorted(t.terminal for t in terminals))


@settings(max_examples=300)
@given(
    policies(),
    MAILS,
    terminal_sets().flatmap(lambda ts: st.tuples(st.just(ts), st.permutations(ts))),
)
def test_property_order_does_not_matter(rules, message, pair):
    terminals, shuffled = pair
    assert decide(rules, message, shuffled) == decide(rules, message, terminals)


@settings(max_examples=300)
@given(policies(), MAILS, terminal_sets())
def test_property_decision_consistent(rules, message, terminals):
    decision: Decision = decide(rules, message, terminals)
    by_id = {t.terminal: t for t in terminals}
    assert list(decision.deliver) == sorted(set(decision.deliver))
    assert list(decision.prompt) == sorted(set(decision.prompt))
    assert len(decision.trace) == len(rules.rules)

    deciding = [t for t in decision.trace if t.selected]
    if decision.rule is None:
        assert deciding == []
        return

    # Exactly the first rule that matched and selected decides, within require.
    assert [t.name for t in deciding] == [decision.rule]
    index = deciding[0].index
    assert all(t.matched is None for t in decision.trace[index + 1 :])
    required = set(rules.rules[index].require)
    assert all(required <= by_id[t].capabilities for t in decision.deliver)
