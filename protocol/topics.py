"""The MQTT topic tree of protocol version 1."""

from dataclasses import dataclass
from enum import StrEnum

from mailpush.protocol.ids import is_valid_id

DEFAULT_ROOT = "mailpush/v1"
# The level under the root for the push service's own topics. No user id can
# take it, because an id starts with a letter or a digit.
SERVICE_LEVEL = "_service"


class TopicKind(StrEnum):
    """The last level of a topic, which names the message type it carries."""

    STATE = "state"
    ATTRIBUTES = "attributes"
    INBOX = "inbox"
    PROBE = "probe"
    ACK = "ack"
    POLICY = "policy"
    MAILSTATUS = "mailstatus"


_TERMINAL_KINDS = {
    TopicKind.STATE,
    TopicKind.ATTRIBUTES,
    TopicKind.INBOX,
    TopicKind.PROBE,
    TopicKind.ACK,
}
_USER_KINDS = {TopicKind.POLICY, TopicKind.MAILSTATUS}


@dataclass(frozen=True, slots=True)
class TopicRef:
    """A parsed topic: whose it is and what it carries."""

    user: str
    terminal: str | None
    kind: TopicKind


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses topics under one root (``mailpush/v1`` by default)."""

    root: str = DEFAULT_ROOT

    def terminal(self, user: str, terminal: str, kind: TopicKind) -> str:
        """Return the topic of ``kind`` for one terminal."""
        return f"{self.root}/{user}/terminals/{terminal}/{kind.value}"

    def state(self, user: str, terminal: str) -> str:
        """Return the retained UsageState topic of a terminal."""
        return self.terminal(user, terminal, TopicKind.STATE)

    def attributes(self, user: str, terminal: str) -> str:
        """Return the retained DeviceAttributes topic of a terminal."""
        return self.terminal(user, terminal, TopicKind.ATTRIBUTES)

    def inbox(self, user: str, terminal: str) -> str:
        """Return the topic the service sends a terminal's pushes to."""
        return self.terminal(user, terminal, TopicKind.INBOX)

    def probe(self, user: str, terminal: str) -> str:
        """Return the topic the service sends a terminal's probes to."""
        return self.terminal(user, terminal, TopicKind.PROBE)

    def ack(self, user: str, terminal: str) -> str:
        """Return the topic a terminal acknowledges pushes on."""
        return self.terminal(user, terminal, TopicKind.ACK)

    def policy(self, user: str) -> str:
        """Return the retained Policy topic of a user."""
        return f"{self.root}/{user}/policy"

    def mailstatus(self, user: str) -> str:
        """Return the topic a user's terminals report read state on."""
        return f"{self.root}/{user}/mailstatus"

    def service_instance(self, instance: str) -> str:
        """Return the retained topic on which a push service instance announces itself."""
        return f"{self.root}/{SERVICE_LEVEL}/instances/{instance}"

    def service_instances(self) -> str:
        """Return the subscription filter for the announcements of every service instance."""
        return self.service_instance("+")

    def parse_service_instance(self, topic: str) -> str | None:
        """Return the instance id of an announcement topic, or None for any other topic."""
        prefix = self.service_instance("")
        if not topic.startswith(prefix):
            return None
        instance = topic[len(prefix) :]
        return instance if is_valid_id(instance) else None

    def all_users(self, kind: TopicKind) -> str:
        """Return a subscription filter for ``kind`` across every user and terminal."""
        if kind in _USER_KINDS:
            return f"{self.root}/+/{kind.value}"
        return f"{self.root}/+/terminals/+/{kind.value}"

    def parse(self, topic: str) -> TopicRef | None:
        """Parse a topic under this root; return None for anything else.

        A topic whose user or terminal level is not a valid id is not parsed,
        so its message is dropped by the caller.
        """
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            return None
        levels = topic[len(prefix) :].split("/")

        if len(levels) == 2:
            user, last = levels
            terminal = None
            kinds = _USER_KINDS
        elif len(levels) == 4 and levels[1] == "terminals":
            user, _, terminal, last = levels
            kinds = _TERMINAL_KINDS
        else:
            return None

        try:
            kind = TopicKind(last)
        except ValueError:
            return None
        if kind not in kinds or not is_valid_id(user):
            return None
        if terminal is not None and not is_valid_id(terminal):
            return None
        return TopicRef(user, terminal, kind)
