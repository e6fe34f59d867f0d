"""Each user's current push policy, kept across restarts.

The policy travels as a retained message, but a broker without persistence
(amqtt, or Mosquitto with ``persistence false``) forgets it on restart. So the
service stores the last good policy of each user in its state dir and loads it
at start. A bad policy is logged and the last good one stays in force.
"""

import logging
import os
import threading
from pathlib import Path

from mailpush.errors import PayloadError
from mailpush.protocol.messages import Policy, encode
from mailpush.protocol.policy import DEFAULT_POLICY, parse_policy_bytes

log = logging.getLogger(__name__)


class PolicyStore:
    """The policy in force per user; files under ``directory``, one per user."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._lock = threading.Lock()
        self._policies: dict[str, Policy] = {}

    def load(self, users: list[str]) -> None:
        """Read the stored policies of ``users``; a damaged file is logged and skipped."""
        for user in users:
            path = self._path(user)
            try:
                payload = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("policy of %s: cannot read %s: %s", user, path, exc)
                continue
            try:
                self._policies[user] = parse_policy_bytes(payload)
            except PayloadError as exc:
                log.warning(
                    "policy of %s: stored file %s is invalid, using the default: %s",
                    user,
                    path,
                    exc,
                )

    def stored(self, user: str) -> Policy | None:
        """Return the user's policy if one was set, or None while the default applies."""
        with self._lock:
            return self._policies.get(user)

    def get(self, user: str) -> Policy:
        """Return the user's policy, or the default one."""
        with self._lock:
            return self._policies.get(user, DEFAULT_POLICY)

    def update(self, user: str, payload: bytes) -> bool:
        """Validate and store a policy received for ``user``; return whether it took effect.

        An empty payload (a cleared retained message) restores the default.
        A policy older than the one in force (by ``updated``) is ignored, so a
        replayed retained message cannot undo a newer change.
        """
        if not payload:
            with self._lock:
                self._policies.pop(user, None)
            self._remove(user)
            log.info("policy of %s cleared; using the default", user)
            return True

        try:
            policy = parse_policy_bytes(payload)
        except PayloadError as exc:
            log.warning("policy of %s rejected, keeping the last good one: %s", user, exc)
            return False

        with self._lock:
            current = self._policies.get(user)
            if current is not None and policy.updated < current.updated:
                log.info(
                    "policy of %s from %s is older than the one in force; ignored",
                    user,
                    policy.set_by,
                )
                return False
            self._policies[user] = policy
        self._save(user, policy)
        log.info(
            "policy of %s set by %s: %d rules, fallback %s",
            user,
            policy.set_by,
            len(policy.rules),
            policy.fallback,
        )
        return True

    def _path(self, user: str) -> Path:
        return self._directory / f"{user}.json"

    def _save(self, user: str, policy: Policy) -> None:
        path = self._path(user)
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            # One temporary name per process: instances that share the state
            # folder store the same policy at the same moment.
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            with temporary.open("wb") as file:
                file.write(encode(policy))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("policy of %s: cannot store it in %s: %s", user, path, exc)

    def _remove(self, user: str) -> None:
        try:
            self._path(user).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("policy of %s: cannot remove the stored file: %s", user, exc)
