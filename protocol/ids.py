"""User and terminal identifiers, and the MQTT client ids built from them."""

import re

from mailpush.errors import InvalidIdError

# \Z, not $: msgspec applies the pattern with re.search, where $ also
# matches before a final newline, so "desk\n" would pass.
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}\Z"
_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def is_valid_id(value: object) -> bool:
    """Return whether ``value`` is a valid user or terminal id."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def validate_id(value: object, key: str) -> str:
    """Return ``value`` if it is a valid id, else raise :class:`InvalidIdError`.

    Args:
        value: the id as configured.
        key: where it was configured (``user``, ``--terminal``), named in the error.
    """
    if is_valid_id(value):
        return value  # type: ignore[return-value]
    msg = (
        f"{key}: invalid id {value!r}; use 1 to 64 characters of a-z, 0-9, '_' and '-', "
        "starting with a letter or digit"
    )
    raise InvalidIdError(msg)


def agent_client_id(user: str, terminal: str) -> str:
    """Return the MQTT client id of the agent on ``terminal``."""
    return f"mailpush-{user}-{terminal}"


def service_client_id(instance: str) -> str:
    """Return the MQTT client id of one push service instance."""
    return f"mailpush-service-{instance}"
