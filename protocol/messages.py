"""The payloads of protocol version 1, as msgspec structs.

Every payload is a UTF-8 JSON object of at most 256 KiB with ``"v": 1``.
``v`` is the struct tag, so msgspec always writes it and rejects any other
value on decode. Unknown fields are ignored, so newer senders stay readable.
Optional fields that are unset are left out of the JSON.
"""

from typing import Annotated, Literal, TypeVar

import msgspec

from mailpush.errors import PayloadError
from mailpush.protocol.ids import ID_PATTERN

MAX_PAYLOAD_BYTES = 256 * 1024

Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Percent = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0)]

StateName = Literal["active", "carried", "present", "idle", "away", "off"]
OffReason = Literal["stopped", "connection-lost", "suspended"]
DeviceKind = Literal["laptop", "desktop", "phone", "tablet", "pi", "other"]
Capability = Literal["images", "attachments", "html", "sound", "color"]
PushKind = Literal["mail", "prompt", "status"]

# States from most to least in use; most-active routing ranks them in this order.
STATES: tuple[StateName, ...] = ("active", "carried", "present", "idle", "away", "off")


class _Payload(msgspec.Struct, tag_field="v", tag=1, kw_only=True, omit_defaults=True):
    """Base of every top-level payload: tagged ``"v": 1``."""


class _Part(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Base of every nested object."""


class Evidence(_Part, kw_only=True):
    """The readings behind a usage state; every field is optional."""

    input_idle_s: Seconds | None = None
    presence: bool | None = None
    presence_age_s: Seconds | None = None
    skin_contact: bool | None = None
    temperature_c: float | None = None


class Power(_Part, kw_only=True):
    """Power facts of a terminal. A desktop has no battery, so both battery fields stay null."""

    on_battery: bool | None = None
    battery_percent: Percent | None = None
    plugged: bool | None = None


class Position(_Part, kw_only=True):
    """The terminal's place relative to its user: a named zone and a proximity."""

    zone: str | None = None
    proximity: Fraction | None = None


class UsageState(_Payload, kw_only=True):
    """A terminal's fused usage state, retained on its ``state`` topic."""

    user: Id
    terminal: Id
    state: StateName
    since: float
    ts: float
    seq: int
    confidence: Fraction
    evidence: Evidence = msgspec.field(default_factory=Evidence)
    power: Power | None = None
    position: Position | None = None
    probe: str | None = None
    reason: OffReason | None = None
    session: str | None = None
    """An id the agent picks for each MQTT connection; the last will carries it too.

    Added to version 1: the will is stamped when the agent connects, so its
    ``ts`` is older than the states sent during that connection. A registry
    accepts an ``off`` whose session matches the state it holds, whatever its ts.
    """


class Display(_Part, kw_only=True):
    """The terminal's screen."""

    width: int
    height: int
    color: bool = True


class AgentInfo(_Part, kw_only=True):
    """The program that publishes for a terminal."""

    name: str
    version: str


class DeviceAttributes(_Payload, kw_only=True):
    """A terminal's kind and display capabilities, retained on its ``attributes`` topic."""

    kind: DeviceKind
    name: str = ""
    capabilities: list[Capability] = msgspec.field(default_factory=list)
    display: Display | None = None
    wakeable: bool = False
    agent: AgentInfo | None = None


class Attachment(_Part, kw_only=True):
    """One attachment of a mail."""

    name: str
    type: str
    size: int


class MailSummary(_Part, kw_only=True):
    """The summary of one mail that a push carries."""

    id: str
    message_id: str = ""
    sender: str = msgspec.field(default="", name="from")
    subject: str = ""
    date: str = ""
    snippet: Annotated[str, msgspec.Meta(max_length=280)] = ""
    size: int = 0
    has_images: bool = False
    attachments: list[Attachment] = msgspec.field(default_factory=list)
    seen: bool = False


class Push(_Payload, kw_only=True):
    """A mail, a prompt about a mail, or a read-state change, sent to one terminal."""

    id: str
    kind: PushKind
    mail: MailSummary
    delivered_to: list[str] = msgspec.field(default_factory=list)
    reason: str = ""
    ts: float


class Ack(_Payload, kw_only=True):
    """A terminal's receipt for a push it has stored."""

    id: str
    ts: float


class Probe(_Payload, kw_only=True):
    """A request from the service for a fresh UsageState."""

    id: str
    ts: float


class Match(_Part, kw_only=True):
    """The conditions of a policy rule; all that are set must hold."""

    has_images: bool | None = None
    has_attachments: bool | None = None
    sender: str | None = msgspec.field(default=None, name="from")
    subject: str | None = None
    min_size: Annotated[int, msgspec.Meta(ge=0)] | None = None


class Rule(_Part, kw_only=True):
    """One policy rule: when ``match`` holds, ``select`` picks the terminals."""

    name: str
    match: Match = msgspec.field(default_factory=Match)
    require: list[Capability] = msgspec.field(default_factory=list)
    select: str
    prompt_others: bool = False


class Policy(_Payload, kw_only=True):
    """A user's push policy, retained on the user's ``policy`` topic."""

    updated: float
    set_by: str
    rules: list[Rule]
    fallback: Literal["all", "none"] = "all"


class MailStatus(_Payload, kw_only=True):
    """A terminal's report that a mail was marked read or unread."""

    mail: str
    seen: bool
    by: Id
    ts: float


class ServiceInstance(_Payload, kw_only=True):
    """A push service instance's announcement, retained while it is connected.

    Its last will is an empty retained message on the same topic, so the
    announcement disappears when the instance dies.
    """

    instance: Id
    started: float
    ts: float


Message = UsageState | DeviceAttributes | Push | Ack | Probe | Policy | MailStatus | ServiceInstance
M = TypeVar("M", bound=_Payload)


class _NeverSent(msgspec.Struct, tag_field="v", tag=0):
    """Decoded beside each type so that msgspec requires the ``v`` tag to be present.

    msgspec enforces a tag only when it decodes a union of tagged structs;
    no sender uses ``"v": 0``, so decoding into this struct is an error too.
    """


_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder] = {}


def encode(message: _Payload) -> bytes:
    """Encode a payload as compact JSON."""
    return _encoder.encode(message)


def decode(payload: bytes, message_type: type[M]) -> M:
    """Decode and validate a payload, or raise :class:`PayloadError` in one line.

    The error names the message type and the field at fault, so a log line
    is enough to find which sender is wrong.
    """
    name = message_type.__name__
    if len(payload) > MAX_PAYLOAD_BYTES:
        msg = f"{name}: payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit"
        raise PayloadError(msg)

    decoder = _decoders.get(message_type)
    if decoder is None:
        decoder = msgspec.json.Decoder(message_type | _NeverSent)  # type: ignore[operator]
        _decoders[message_type] = decoder
    try:
        message = decoder.decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass of DecodeError
        detail = str(exc).replace("\n", " ")
        msg = f"{name}: invalid payload: {detail}"
        raise PayloadError(msg) from None
    except RecursionError:
        # msgspec recurses per nesting level, even in fields it ignores.
        msg = f"{name}: invalid payload: JSON nested too deeply"
        raise PayloadError(msg) from None

    if isinstance(message, _NeverSent):
        msg = f"{name}: invalid payload: Invalid value 0 - at `$.v`"
        raise PayloadError(msg)
    return message
