"""Fuzz every MQTT payload type: a bad payload is rejected in one line, never with a crash.

Each target pairs a hypothesis strategy with a property function. The
strategies start from valid-looking payloads and mutate them (a dropped
field, a wrong type, a wrong ``v``, a huge string, NUL, non-UTF-8 bytes, deep
nesting), so most inputs reach the field checks instead of failing at the
first byte. ``bench/fuzz.py`` runs the same targets for a million inputs.
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailpush.errors import MailpushError, PayloadError
from mailpush.protocol.ids import is_valid_id
from mailpush.protocol.messages import (
    MAX_PAYLOAD_BYTES,
    STATES,
    Ack,
    DeviceAttributes,
    MailStatus,
    Policy,
    Probe,
    Push,
    UsageState,
    decode,
    encode,
)
from mailpush.protocol.policy import parse_policy_bytes, validate_policy

# Deep enough to reach msgspec's recursion limit (about 1,000 levels), which
# once raised RecursionError out of decode().
MAX_DEPTH = 5_000

CI_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Target:
    """One fuzz target: inputs to draw and the property every input must satisfy."""

    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]


# ---------------------------------------------------------------- shared checks


def assert_one_line(message: str, prefix: str = "") -> None:
    """Assert that an error message is one non-empty line starting with ``prefix``."""
    assert message.strip(), "empty error message"
    assert "\n" not in message, f"multi-line message: {message!r}"
    assert "\r" not in message, f"multi-line message: {message!r}"
    assert message.startswith(prefix), f"message {message!r} does not start with {prefix!r}"


def assert_rejection(error: MailpushError, prefix: str, field: str | None) -> None:
    """Assert that a rejection is one line that names ``field`` when one is at fault."""
    message = str(error)
    assert_one_line(message, prefix)
    if field is not None:
        forms = (f"`{field}`", f".{field}`", f".{field}[", f" {field}:", f".{field}:")
        assert any(form in message for form in forms), (
            f"message {message!r} does not name the field {field!r}"
        )


# ---------------------------------------------------------------- valid-looking payloads

GOOD_IDS = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,63}", fullmatch=True)
_BAD_IDS = ["Alice", "a/b", "a+b", "#", "", "a\x00b", "x" * 65, "désk", "-lead", " desk", "desk\n"]
IDS = st.one_of(GOOD_IDS, GOOD_IDS, GOOD_IDS, st.sampled_from(_BAD_IDS))
TEXT = st.text(max_size=40)
RULE_NAMES = TEXT
NUMBERS = st.floats(allow_nan=False, allow_infinity=False, width=64)
TIMES = st.floats(min_value=0, max_value=4e9)
FRACTIONS = st.floats(min_value=0, max_value=1)
CAPABILITIES = ["images", "attachments", "html", "sound", "color"]
KINDS = ["laptop", "desktop", "phone", "tablet", "pi", "other"]
SELECTS = st.one_of(
    st.sampled_from(["most-active", "closest", "all", "prefer:laptop", "kinds:pi+phone"]),
    st.builds("terminal:{}".format, IDS),
    st.sampled_from(["prefer:toaster", "kinds:laptop+laptop", "kinds:", "terminal:", "any"]),
    TEXT,
)


def _object(required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(required, optional=optional)


EVIDENCE = _object(
    {},
    {
        "input_idle_s": st.floats(min_value=0, max_value=1e7),
        "presence": st.booleans(),
        "presence_age_s": st.floats(min_value=0, max_value=1e7),
        "skin_contact": st.booleans(),
        "temperature_c": st.floats(min_value=-40, max_value=125),
    },
)
POWER = _object(
    {},
    {
        "on_battery": st.booleans(),
        "battery_percent": st.floats(min_value=0, max_value=100),
        "plugged": st.booleans(),
    },
)
POSITION = _object({}, {"zone": TEXT, "proximity": FRACTIONS})
MAIL = _object(
    {"id": TEXT},
    {
        "message_id": TEXT,
        "from": TEXT,
        "subject": TEXT,
        "date": TEXT,
        "snippet": st.text(max_size=300),
        "size": st.integers(min_value=0, max_value=2**40),
        "has_images": st.booleans(),
        "attachments": st.lists(
            _object(
                {"name": TEXT, "type": TEXT, "size": st.integers(min_value=0, max_value=2**31)}, {}
            ),
            max_size=3,
        ),
        "seen": st.booleans(),
    },
)
RULE = _object(
    {"name": RULE_NAMES, "select": SELECTS},
    {
        "match": _object(
            {},
            {
                "has_images": st.booleans(),
                "has_attachments": st.booleans(),
                "from": st.sampled_from(["*@example.org", "[ab]*", "[oops", "", "*"]),
                "subject": TEXT,
                "min_size": st.integers(min_value=-5, max_value=2**31),
            },
        ),
        "require": st.lists(st.sampled_from([*CAPABILITIES, "smell"]), max_size=3),
        "prompt_others": st.booleans(),
    },
)

# For each message type: the strategy of a valid-looking object, and its required fields.
SHAPES: dict[type, tuple[st.SearchStrategy[dict], tuple[str, ...]]] = {
    UsageState: (
        _object(
            {
                "v": st.just(1),
                "user": IDS,
                "terminal": IDS,
                "state": st.sampled_from(STATES),
                "since": TIMES,
                "ts": TIMES,
                "seq": st.integers(min_value=0, max_value=2**53),
                "confidence": FRACTIONS,
            },
            {
                "evidence": EVIDENCE,
                "power": st.one_of(st.none(), POWER),
                "position": st.one_of(st.none(), POSITION),
                "probe": TEXT,
                "reason": st.sampled_from(["stopped", "connection-lost", "suspended", "bored"]),
                "session": TEXT,
            },
        ),
        ("v", "user", "terminal", "state", "since", "ts", "seq", "confidence"),
    ),
    DeviceAttributes: (
        _object(
            {"v": st.just(1), "kind": st.sampled_from([*KINDS, "fridge"])},
            {
                "name": TEXT,
                "capabilities": st.lists(st.sampled_from(CAPABILITIES), max_size=5),
                "display": st.one_of(
                    st.none(),
                    _object(
                        {"width": st.integers(0, 10_000), "height": st.integers(0, 10_000)},
                        {"color": st.booleans()},
                    ),
                ),
                "wakeable": st.booleans(),
                "agent": _object({"name": TEXT, "version": TEXT}, {}),
            },
        ),
        ("v", "kind"),
    ),
    Push: (
        _object(
            {
                "v": st.just(1),
                "id": TEXT,
                "kind": st.sampled_from(["mail", "prompt", "status", "spam"]),
                "mail": MAIL,
                "ts": TIMES,
            },
            {"delivered_to": st.lists(IDS, max_size=3), "reason": TEXT},
        ),
        ("v", "id", "kind", "mail", "ts"),
    ),
    Ack: (_object({"v": st.just(1), "id": TEXT, "ts": TIMES}, {}), ("v", "id", "ts")),
    Probe: (_object({"v": st.just(1), "id": TEXT, "ts": TIMES}, {}), ("v", "id", "ts")),
    Policy: (
        _object(
            {
                "v": st.just(1),
                "updated": TIMES,
                "set_by": TEXT,
                "rules": st.lists(RULE, max_size=4),
            },
            {"fallback": st.sampled_from(["all", "none", "some"])},
        ),
        ("v", "updated", "set_by", "rules"),
    ),
    MailStatus: (
        _object({"v": st.just(1), "mail": TEXT, "seen": st.booleans(), "by": IDS, "ts": TIMES}, {}),
        ("v", "mail", "seen", "by", "ts"),
    ),
}

# Fields typed as a protocol id, which an accepted payload must carry in valid form.
ID_FIELDS: dict[type, tuple[str, ...]] = {UsageState: ("user", "terminal"), MailStatus: ("by",)}

WRONG_VALUES = [None, True, 0, -1, 1.5, 2**70, "x", "", "\x00", [], {}, [1, "a"], {"v": 1}]
WRONG_VERSIONS = [0, 2, "1", 1.5, None, True, -1, [1]]
HUGE_STRING = "x" * (MAX_PAYLOAD_BYTES + 16)


# ---------------------------------------------------------------- mutations


@dataclass(frozen=True)
class Case:
    """A payload to decode, with what the mutation that made it requires.

    ``must_reject`` is set when the mutation always makes the payload invalid;
    ``field`` names the field a rejection must name, when one is at fault.
    """

    payload: bytes
    mutation: str
    field: str | None = None
    must_reject: bool = False


def _leaf_fields(data: dict, prefix: str = "") -> list[tuple[str, ...]]:
    """Return the key paths of every field, nested objects included."""
    paths: list[tuple[str, ...]] = []
    for key, value in data.items():
        paths.append((key,))
        if isinstance(value, dict):
            paths.extend((key, *sub) for sub in _leaf_fields(value))
    return paths


def _set(data: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def _nested(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def _accepted(message_type: type, data: dict) -> bool:
    """Return whether ``data`` is valid before any mutation, policy rules included."""
    try:
        if message_type is Policy:
            parse_policy_bytes(json.dumps(data).encode())
        else:
            decode(json.dumps(data).encode(), message_type)
    except PayloadError:
        return False
    return True


@st.composite
def cases(draw: st.DrawFn, message_type: type) -> Case:
    """Draw a valid-looking payload of ``message_type`` with at most one structural mutation.

    A rejection must name the mutated field only when the payload was valid
    before the mutation; otherwise an earlier field may be the one named.
    """
    shape, required = SHAPES[message_type]
    data = draw(shape)
    valid_before = _accepted(message_type, data)
    mutation = draw(
        st.sampled_from(
            ["none", "drop", "wrong-type", "wrong-v", "huge", "nul", "deep", "surrogate"]
        )
    )
    field: str | None = None
    must_reject = False

    if mutation == "drop":
        key = draw(st.sampled_from(required))
        del data[key]
        field, must_reject = key, True
    elif mutation == "wrong-type":
        path = draw(st.sampled_from(_leaf_fields(data)))
        _set(data, path, draw(st.sampled_from(WRONG_VALUES)))
        field = path[-1]
        must_reject = path == ("v",)
    elif mutation == "wrong-v":
        data["v"] = draw(st.sampled_from(WRONG_VERSIONS))
        field, must_reject = "v", True
    elif mutation == "huge":
        data[draw(st.sampled_from(["id", "name", "mail", "zzz"]))] = HUGE_STRING
        must_reject = True
    elif mutation == "nul":
        path = draw(st.sampled_from(_leaf_fields(data)))
        _set(data, path, draw(TEXT) + "\x00" + draw(TEXT))
        field = path[-1]

    text = json.dumps(data)
    if mutation == "deep":
        depth = draw(st.integers(min_value=1, max_value=MAX_DEPTH))
        nested = _nested(depth, draw(st.sampled_from(["list", "object"])))
        text = text[:-1] + (", " if data else "") + f'"unknown": {nested}}}'
    elif mutation == "surrogate":
        text = text[:-1] + (", " if data else "") + '"unknown": "\\ud800"}'
    payload = text.encode()
    return Case(payload, mutation, field if valid_before else None, must_reject)


@st.composite
def byte_cases(draw: st.DrawFn, message_type: type) -> Case:
    """Draw a valid-looking payload and damage its bytes: cut, overwrite, insert, wrap."""
    base = draw(cases(message_type))
    payload = bytearray(base.payload)
    damage = draw(st.sampled_from(["cut", "overwrite", "insert-ff", "bom", "garbage", "random"]))
    if damage == "random":
        return Case(draw(st.binary(max_size=200)), "random bytes")
    position = draw(st.integers(min_value=0, max_value=len(payload)))
    if damage == "cut":
        del payload[position:]
    elif damage == "overwrite" and position < len(payload):
        payload[position] = draw(st.integers(min_value=0, max_value=255))
    elif damage == "insert-ff":
        payload[position:position] = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"]))
    elif damage == "bom":
        payload[0:0] = b"\xef\xbb\xbf"
    elif damage == "garbage":
        payload += draw(st.binary(min_size=1, max_size=20))
    return Case(bytes(payload), f"{base.mutation}+{damage}")


def payloads(message_type: type) -> st.SearchStrategy[Case]:
    """Return structural and byte-level cases for ``message_type``, about half each."""
    return st.one_of(cases(message_type), byte_cases(message_type))


# ---------------------------------------------------------------- properties


def check_decode(message_type: type, case: Case) -> None:
    """Assert the decode contract for one payload.

    A payload is accepted as ``message_type`` or rejected with a one-line
    :class:`PayloadError` naming the type, and the field when one is at fault.
    An accepted payload is within the size limit, has valid ids and survives
    an encode and decode unchanged. msgspec skips an unknown field without
    checking its UTF-8, which is harmless because the field is dropped.
    """
    name = message_type.__name__
    try:
        message = decode(case.payload, message_type)
    except PayloadError as exc:
        assert_rejection(exc, f"{name}: ", case.field)
        return

    assert not case.must_reject, f"{case.mutation}: accepted {case.payload[:200]!r}"
    assert isinstance(message, message_type)
    assert len(case.payload) <= MAX_PAYLOAD_BYTES
    for field in ID_FIELDS.get(message_type, ()):
        value = getattr(message, field)
        assert is_valid_id(value), f"{name}.{field}: accepted invalid id {value!r}"
    assert decode(encode(message), message_type) == message


def check_policy_bytes(case: Case) -> None:
    """Assert that ``parse_policy_bytes`` returns a valid policy or one PayloadError line."""
    try:
        policy = parse_policy_bytes(case.payload)
    except PayloadError as exc:
        assert_rejection(exc, "Policy: ", case.field)
        return

    assert not case.must_reject, f"{case.mutation}: accepted {case.payload[:200]!r}"
    assert validate_policy(policy) is policy
    names = [rule.name for rule in policy.rules]
    assert len(set(names)) == len(names), f"duplicate rule names accepted: {names}"
    assert all(name.strip() for name in names)
    for rule in policy.rules:
        assert rule.match.min_size is None or rule.match.min_size >= 0
    assert math.isfinite(policy.updated)


def _decode_target(message_type: type) -> Target:
    return Target(
        f"decode {message_type.__name__}",
        payloads(message_type),
        lambda case: check_decode(message_type, case),
    )


TARGETS = [
    *(_decode_target(message_type) for message_type in SHAPES),
    Target("parse_policy_bytes", payloads(Policy), check_policy_bytes),
]


# ---------------------------------------------------------------- the CI run


@pytest.mark.parametrize("target", TARGETS, ids=[target.name for target in TARGETS])
def test_payload_target_holds(target: Target) -> None:
    @CI_SETTINGS
    @given(target.strategy)
    def run(case: Any) -> None:
        target.check(case)

    run()


@pytest.mark.parametrize("message_type", list(SHAPES), ids=lambda t: t.__name__)
def test_oversized_payload_rejected(message_type: type) -> None:
    shape_padding = b" " * (MAX_PAYLOAD_BYTES + 1)

    with pytest.raises(PayloadError) as caught:
        decode(b'{"v": 1}' + shape_padding, message_type)

    assert_one_line(str(caught.value), f"{message_type.__name__}: payload of ")
    assert "262144-byte limit" in str(caught.value)


@pytest.mark.parametrize("message_type", list(SHAPES), ids=lambda t: t.__name__)
def test_missing_v_named(message_type: type) -> None:
    with pytest.raises(PayloadError) as caught:
        decode(b"{}", message_type)

    assert_rejection(caught.value, f"{message_type.__name__}: ", None)
    assert "`" in str(caught.value), "the message should name a field"


def test_valid_shapes_accepted() -> None:
    # Guards the strategies themselves: an unmutated payload of good ids decodes.
    state = {
        "v": 1, "user": "alice", "terminal": "desk", "state": "idle",
        "since": 1.0, "ts": 2.0, "seq": 3, "confidence": 0.5,
    }  # fmt: skip

    decoded = decode(json.dumps(state).encode(), UsageState)

    assert decoded.terminal == "desk"
    assert msgspec.to_builtins(decoded)["v"] == 1
