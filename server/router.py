"""Routing one mail: probe stale terminals, apply the policy, build the pushes."""

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from mailpush.protocol.messages import MailSummary, Probe, Push, encode
from mailpush.protocol.policy import Decision, decide
from mailpush.server.config import ServiceSettings, UserSettings
from mailpush.server.outbox import QueuedPush
from mailpush.server.policies import PolicyStore
from mailpush.server.registry import Registry

log = logging.getLogger(__name__)

SendProbe = Callable[[str, str, bytes], None]


@dataclass(frozen=True)
class Routed:
    """A routing decision and the pushes that carry it out."""

    decision: Decision
    pushes: tuple[QueuedPush, ...]


class Router:
    """Decides where each mail of a user goes.

    Args:
        settings: the service timing (stale and probe thresholds).
        registry: the terminal states.
        policies: the policy in force per user.
        send_probe: publishes a Probe payload to ``(user, terminal)``.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        registry: Registry,
        policies: PolicyStore,
        send_probe: SendProbe,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._policies = policies
        self._send_probe = send_probe

    def route(self, user: UserSettings, mail: MailSummary) -> Routed:
        """Probe if the user's report mode asks for it, decide, and build the pushes."""
        if user.report_mode in ("probe", "both"):
            self._probe_stale(user)

        views = self._registry.views(user.id, self._settings.stale_after_s)
        decision = decide(self._policies.get(user.id), mail, views)
        return Routed(decision, self._pushes(decision, mail))

    def _probe_stale(self, user: UserSettings) -> None:
        """Probe every terminal whose state is older than the probe threshold, then wait.

        In ``probe`` mode every terminal that is not off is probed before each
        mail; in ``both`` mode only those whose state is older than
        ``probe_after_s``. Off terminals are not probed: their will or their
        goodbye is their last word until they come back.
        """
        now = time.time()
        threshold = 0.0 if user.report_mode == "probe" else self._settings.probe_after_s
        waiting: dict[str, float | None] = {}
        for terminal, record in self._registry.terminals(user.id).items():
            state = record.state
            if state is not None and state.state == "off":
                continue
            if state is not None and now - state.ts <= threshold:
                continue
            waiting[terminal] = state.ts if state is not None else None

        if not waiting:
            return
        probe_id = uuid.uuid4().hex
        payload = encode(Probe(id=probe_id, ts=now))
        for terminal in waiting:
            self._send_probe(user.id, terminal, payload)

        timeout = self._settings.probe_timeout_ms / 1000
        missing = self._registry.wait_for_states(user.id, waiting, timeout)
        if missing:
            log.debug(
                "probe %s: no response from %s within %.0f ms",
                probe_id,
                sorted(missing),
                timeout * 1000,
            )

    def _pushes(self, decision: Decision, mail: MailSummary) -> tuple[QueuedPush, ...]:
        now = round(time.time(), 3)
        pushes = []
        for terminal in decision.deliver:
            push = Push(
                id=uuid.uuid4().hex,
                kind="mail",
                mail=mail,
                delivered_to=list(decision.deliver),
                reason=decision.reason,
                ts=now,
            )
            pushes.append(QueuedPush(terminal, push.id, "mail", encode(push)))
        for terminal in decision.prompt:
            push = Push(
                id=uuid.uuid4().hex,
                kind="prompt",
                mail=_prompt_summary(mail),
                delivered_to=list(decision.deliver),
                reason=decision.reason,
                ts=now,
            )
            pushes.append(QueuedPush(terminal, push.id, "prompt", encode(push)))
        return tuple(pushes)


def _prompt_summary(mail: MailSummary) -> MailSummary:
    # A prompt is a short notice. It names the mail, but the body preview and
    # the attachment list stay with the terminal that got the mail.
    return MailSummary(
        id=mail.id,
        message_id=mail.message_id,
        sender=mail.sender,
        subject=mail.subject,
        date=mail.date,
        size=mail.size,
        has_images=mail.has_images,
        seen=mail.seen,
    )
