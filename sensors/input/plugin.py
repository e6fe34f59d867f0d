"""The ``input`` sensor: when the user last typed, pointed or touched.

Two backends sense input: pynput (X11, Windows, macOS) and evdev (Linux
``/dev/input``, which also works under Wayland, on the console and headless).
:func:`choose_backend` picks one in a fixed order; the config key
``backend`` or the environment variable ``MAILPUSH_INPUT_BACKEND`` forces one.

Privacy: the backends call :meth:`ActivityClock.touch` with no arguments, so
no key code, character or pointer position reaches this module. The only
value kept from the input is the :func:`clock` time of the last event. The
rule for waking the agent adds a count of wakes and a flag.
"""

import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from mailpush.errors import ConfigError, SensorError
from mailpush.sensors.base import (
    Health,
    Mode,
    Reading,
    SensorPlugin,
    SensorStatus,
    WakeCallback,
    clock,
)
from mailpush.sensors.input.evdev_backend import EvdevBackend, NodeAccess
from mailpush.sensors.input.x11 import HOLD_S, PynputBackend, x_display_problem

log = logging.getLogger(__name__)

BACKEND_ENV = "MAILPUSH_INPUT_BACKEND"
BACKENDS = ("auto", "pynput", "evdev")
# One more than the fusion's default confirm_events (2), so a confirm_events
# of 3 also turns active without waiting for the agent's periodic fusion.
WAKE_EVENTS = 3


@dataclass(frozen=True)
class InputOptions(SensorPlugin.Options):
    """Config keys of ``[sensors.input]``.

    Attributes:
        backend: ``auto`` picks one (see :func:`choose_backend`); ``pynput``
            or ``evdev`` forces it. ``MAILPUSH_INPUT_BACKEND`` overrides this.
        devices: evdev device names (``evtest`` lists them) or node paths
            such as ``/dev/input/by-id/...`` to read; empty reads every
            keyboard, pointer and touch device. The pynput backend ignores it.
        rescan_interval_s: how often evdev looks for new or returning devices.
        wake_after_s: a gap of more than this many seconds between two events
            is a quiet spell, and the event after it starts a burst.
        wake_events: how many events of a burst wake the agent, each only once
            the agent has read the sensor since the previous wake. The fusion
            needs ``fusion.confirm_events`` of them to turn ``active`` at once.
            Later events of the burst do not wake it. Limitation: nothing checks
            it against ``fusion.confirm_events``, because a sensor plugin does
            not see the fusion settings.
    """

    backend: Literal["auto", "pynput", "evdev"] = "auto"
    devices: list[str] = field(default_factory=list)
    rescan_interval_s: float = 5.0
    wake_after_s: float = 1.0
    wake_events: int = WAKE_EVENTS

    def __post_init__(self) -> None:
        if not 0.1 <= self.rescan_interval_s <= 3600:
            msg = (
                f"sensors.input.rescan_interval_s: invalid value {self.rescan_interval_s!r}; "
                "expected a number of seconds from 0.1 to 3600"
            )
            raise ConfigError(msg)
        if not 0 <= self.wake_after_s <= 3600:
            msg = (
                f"sensors.input.wake_after_s: invalid value {self.wake_after_s!r}; "
                "expected a number of seconds from 0 to 3600"
            )
            raise ConfigError(msg)
        if not 1 <= self.wake_events <= 100:
            msg = (
                f"sensors.input.wake_events: invalid value {self.wake_events!r}; "
                "expected a whole number from 1 to 100"
            )
            raise ConfigError(msg)
        for name in self.devices:
            if not name.strip():
                msg = "sensors.input.devices: empty device name; remove it or name a device"
                raise ConfigError(msg)


class ActivityClock:
    """The time of the last input event, and the rule for waking the agent.

    A burst is the run of events that follows a quiet spell. Its first
    ``wake_events`` events wake the agent, but each one only after the agent
    has called :meth:`read` since the previous wake. So each of those fusions
    reads a new input time, and distinct input times are what the fusion's
    ``confirm_events`` hysteresis counts. A storm of 1,000 events/s costs
    ``wake_events`` wakes, not one per event.

    ``touch`` runs inside input callbacks: it does no I/O, no logging and no
    allocation beyond one float, and it takes no event data at all. Besides
    that time, the clock keeps only a count of wakes and a flag.

    Args:
        wake: requests a new fusion from the agent.
        wake_after_s: an event more than this many seconds after the previous
            one starts a burst.
        wake_events: how many events of a burst may wake the agent.
    """

    __slots__ = (
        "last_input",
        "_wake",
        "_wake_after_s",
        "_wake_events",
        "_wakes_left",
        "_read_since_wake",
    )

    def __init__(
        self, wake: WakeCallback, wake_after_s: float, wake_events: int = WAKE_EVENTS
    ) -> None:
        self.last_input: float | None = None
        self._wake = wake
        self._wake_after_s = wake_after_s
        self._wake_events = wake_events
        self._wakes_left = 0
        self._read_since_wake = True

    def touch(self) -> None:
        """Record an input event now, and wake the agent on the first events of a burst."""
        now = clock()
        previous = self.last_input
        self.last_input = now
        if previous is None or now - previous > self._wake_after_s:
            self._wakes_left = self._wake_events
            self._read_since_wake = True

        # Two listener threads (pynput's keyboard and mouse) may run this at
        # once. A race costs at most one wake too many or too few, and the
        # agent's next periodic fusion reads the input time anyway.
        if self._wakes_left and self._read_since_wake:
            self._wakes_left -= 1
            self._read_since_wake = False
            self._wake()

    def read(self) -> float | None:
        """Return the time of the last input event, and allow the next wake of a burst."""
        self._read_since_wake = True
        return self.last_input


@dataclass(frozen=True, slots=True)
class Choice:
    """The backend to start and why.

    Attributes:
        backend: ``"pynput"``, ``"evdev"``, or ``None`` when neither can work.
        reason: why this backend was chosen, or why none can work.
        fallback: why the preferred backend was passed over; empty when it was
            not. The plugin logs it once at WARNING.
    """

    backend: Literal["pynput", "evdev"] | None
    reason: str
    fallback: str = ""


def choose_backend(
    configured: str,
    env: Mapping[str, str],
    platform: str,
    evdev_problem: Callable[[], str | None],
    x_problem: Callable[[], str | None],
) -> Choice:
    """Pick the input backend; the first rule that applies wins.

    1. ``MAILPUSH_INPUT_BACKEND``, then the ``backend`` config key, forces one.
    2. Off Linux, pynput, because evdev exists on Linux only.
    3. In a Wayland session, evdev: an X client sees only XWayland windows,
       so pynput would miss input to every native Wayland window.
    4. evdev, when at least one allowed device can be opened.
    5. pynput, when an X display is reachable.
    6. None, with evdev's reason, because that one names the fix.

    Args:
        configured: the ``backend`` config key.
        env: the process environment.
        platform: ``sys.platform``.
        evdev_problem: returns why evdev cannot read any device, or ``None``.
        x_problem: returns why no X display is reachable, or ``None``.
    """
    forced = _forced_backend(configured, env)
    if isinstance(forced, Choice):
        return forced

    wayland = _wayland_session(env)
    linux = platform.startswith("linux")
    if forced == "evdev":
        if not linux:
            return Choice(None, f"the evdev backend works on Linux only, not on {platform}")
        return Choice("evdev", _forced_by(configured, env, forced))
    if forced == "pynput":
        warning = ""
        if wayland:
            warning = f"pynput is forced in a {wayland}: it sees only input to XWayland windows"
        return Choice("pynput", _forced_by(configured, env, forced), warning)

    if not linux:
        return Choice("pynput", f"pynput is the only input backend on {platform}")
    if wayland:
        return Choice("evdev", f"{wayland}: the X backend would see only XWayland windows")

    evdev_reason = evdev_problem()
    if evdev_reason is None:
        return Choice("evdev", "input devices in /dev/input are readable")

    x_reason = x_problem()
    if x_reason is None:
        display = env.get("DISPLAY", "")
        return Choice(
            "pynput",
            f"X display {display!r} is reachable",
            f"evdev not used ({evdev_reason}); falling back to pynput on X display {display!r}",
        )
    return Choice(None, f"{evdev_reason} (and pynput cannot be used: {x_reason})")


class InputSensor(SensorPlugin):
    """Senses the time of the last keyboard, pointer or touch input.

    Args:
        options: validated ``[sensors.input]`` keys.
        node_access: how the evdev backend lists and opens event nodes;
            ``None`` uses python-evdev on ``/dev/input``. Tests pass doubles here.
    """

    name = "input"
    mode = Mode.EVENTS
    enabled_by_default = True
    Options = InputOptions

    def __init__(
        self,
        options: InputOptions | None = None,
        *,
        node_access: NodeAccess | None = None,
    ) -> None:
        super().__init__(options)
        self.options: InputOptions
        self._node_access = node_access
        self._activity: ActivityClock | None = None
        self._backend: PynputBackend | EvdevBackend | None = None
        self._unavailable = SensorStatus(Health.UNAVAILABLE, "input sensor is not started")

    def start(self, wake: WakeCallback) -> None:
        """Choose a backend and start it; a failure becomes the status, never an exception."""
        self.stop()
        self._activity = ActivityClock(wake, self.options.wake_after_s, self.options.wake_events)
        env = os.environ
        candidate: dict[str, EvdevBackend] = {}

        def evdev_problem() -> str | None:
            # Starting evdev is the probe: the devices it opens are kept when it is chosen.
            backend, problem = self._start_evdev()
            if backend is not None:
                candidate["evdev"] = backend
            return problem

        choice = choose_backend(
            self.options.backend, env, sys.platform, evdev_problem, lambda: x_display_problem(env)
        )
        if choice.fallback:
            log.warning("sensors.input: %s", choice.fallback)

        probed = candidate.pop("evdev", None)
        if probed is not None and choice.backend in ("evdev", None):
            # With no usable backend, evdev keeps running so that it picks up a
            # keyboard plugged in later. Its status gives the reason it reads nothing.
            self._backend = probed
        else:
            if probed is not None:
                probed.stop()
            self._start_chosen(choice)

        self._log_outcome(choice)

    def stop(self) -> None:
        """Stop the backend. Safe to call twice or without ``start``."""
        if self._backend is not None:
            self._backend.stop()
            self._backend = None

    def read(self) -> Reading:
        """Return the time of the last input event and the backend in use.

        The read lets the next event of a burst wake the agent again.
        """
        last_input = self._activity.read() if self._activity is not None else None
        return Reading(last_input=last_input, details=self.details())

    def status(self) -> SensorStatus:
        """Return the backend's health, or why no backend runs."""
        if self._backend is None:
            return self._unavailable
        return self._backend.status()

    def details(self) -> dict[str, object]:
        """Return the backend name and its device or listener count; never input data."""
        if self._backend is None:
            return {"backend": "none"}
        return self._backend.details()

    def _start_chosen(self, choice: Choice) -> None:
        if choice.backend is None:
            self._unavailable = SensorStatus(Health.UNAVAILABLE, choice.reason)
            return

        if choice.backend == "evdev":
            backend, problem = self._start_evdev()
            if backend is None:
                self._unavailable = SensorStatus(Health.UNAVAILABLE, problem or "")
            self._backend = backend
            return

        self._start_pynput()

    def _start_evdev(self) -> tuple[EvdevBackend | None, str | None]:
        """Start evdev; return it (or ``None``) and why it reads no device (or ``None``)."""
        assert self._activity is not None
        backend = EvdevBackend(
            self._activity.touch,
            self.options.devices,
            self.options.rescan_interval_s,
            self._node_access,
        )
        try:
            backend.start()
        except SensorError as exc:
            return None, str(exc)

        status = backend.status()
        if status.health is Health.UNAVAILABLE:
            return backend, status.reason
        return backend, None

    def _start_pynput(self) -> None:
        assert self._activity is not None
        if self.options.devices:
            log.warning("sensors.input: devices applies to evdev only; pynput reads every device")

        options = self.options
        backend = PynputBackend(
            self._activity.touch,
            hold_s=min(HOLD_S, options.wake_after_s / 2),
            free_events=options.wake_events,
            quiet_s=options.wake_after_s,
        )
        try:
            backend.start()
        except SensorError as exc:
            self._unavailable = SensorStatus(Health.UNAVAILABLE, str(exc))
            return
        self._backend = backend

    def _log_outcome(self, choice: Choice) -> None:
        status = self.status()
        if choice.backend is None:
            log.warning("sensors.input: no input backend can be used: %s", choice.reason)
        elif self._backend is not None and status.health is Health.OK:
            log.info("sensors.input: using %s (%s)", self._backend.name, choice.reason)
        else:
            health = status.health.value
            log.warning("sensors.input: %s is %s: %s", choice.backend, health, status.reason)


def _forced_backend(configured: str, env: Mapping[str, str]) -> str | Choice:
    from_env = env.get(BACKEND_ENV, "").strip().lower()
    if from_env and from_env not in BACKENDS:
        allowed = ", ".join(BACKENDS)
        reason = f"{BACKEND_ENV}={env[BACKEND_ENV]!r} is invalid; set it to one of {allowed}"
        return Choice(None, reason)
    if from_env and from_env != "auto":
        return from_env
    return configured


def _forced_by(configured: str, env: Mapping[str, str], backend: str) -> str:
    if env.get(BACKEND_ENV, "").strip().lower() == backend:
        return f"forced by {BACKEND_ENV}={backend}"
    return f'forced by sensors.input.backend = "{backend}"'


def _wayland_session(env: Mapping[str, str]) -> str:
    """Return a description of the Wayland session, or an empty string outside one."""
    if env.get("WAYLAND_DISPLAY"):
        return "Wayland session (WAYLAND_DISPLAY is set)"
    if env.get("XDG_SESSION_TYPE", "").lower() == "wayland":
        return "Wayland session (XDG_SESSION_TYPE=wayland)"
    return ""
