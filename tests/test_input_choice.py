"""Which input backend choose_backend picks, and the reason it gives."""

import pytest

from mailpush.sensors.input.evdev_backend import permission_reason
from mailpush.sensors.input.plugin import Choice, choose_backend

DENIED = permission_reason("/dev/input/event3")
NO_DISPLAY = "DISPLAY is not set, so no X display is reachable"
X11 = {"DISPLAY": ":0", "XDG_SESSION_TYPE": "x11"}


class Probe:
    """A probe result that records whether it was asked."""

    def __init__(self, problem: str | None) -> None:
        self.problem = problem
        self.calls = 0

    def __call__(self) -> str | None:
        self.calls += 1
        return self.problem


CASES = [
    pytest.param(
        "auto", X11, "linux", None, None,
        Choice("evdev", "input devices in /dev/input are readable"),
        id="linux-evdev-first",
    ),
    pytest.param(
        "auto", X11, "linux", DENIED, None,
        Choice(
            "pynput",
            "X display ':0' is reachable",
            f"evdev not used ({DENIED}); falling back to pynput on X display ':0'",
        ),
        id="unreadable-nodes-fall-back-to-x",
    ),
    pytest.param(
        "auto", {}, "linux", DENIED, NO_DISPLAY,
        Choice(None, f"{DENIED} (and pynput cannot be used: {NO_DISPLAY})"),
        id="headless-unreadable-nodes",
    ),
    pytest.param(
        "auto", {"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"}, "linux", DENIED, None,
        Choice("evdev", "Wayland session (WAYLAND_DISPLAY is set): the X backend would see only XWayland windows"),
        id="wayland-display-distrusts-x",
    ),
    pytest.param(
        "auto", {"XDG_SESSION_TYPE": "wayland", "DISPLAY": ":0"}, "linux", None, None,
        Choice("evdev", "Wayland session (XDG_SESSION_TYPE=wayland): the X backend would see only XWayland windows"),
        id="wayland-session-type",
    ),
    pytest.param(
        "auto", {}, "darwin", "unused", "unused",
        Choice("pynput", "pynput is the only input backend on darwin"),
        id="macos",
    ),
    pytest.param(
        "auto", {}, "win32", "unused", "unused",
        Choice("pynput", "pynput is the only input backend on win32"),
        id="windows",
    ),
    pytest.param(
        "pynput", X11, "linux", None, None,
        Choice("pynput", 'forced by sensors.input.backend = "pynput"'),
        id="config-forces-pynput",
    ),
    pytest.param(
        "evdev", X11, "linux", DENIED, None,
        Choice("evdev", 'forced by sensors.input.backend = "evdev"'),
        id="config-forces-evdev-even-unreadable",
    ),
    pytest.param(
        "pynput", {**X11, "MAILPUSH_INPUT_BACKEND": "evdev"}, "linux", None, None,
        Choice("evdev", "forced by MAILPUSH_INPUT_BACKEND=evdev"),
        id="env-overrides-config",
    ),
    pytest.param(
        "evdev", {**X11, "MAILPUSH_INPUT_BACKEND": "auto"}, "linux", None, None,
        Choice("evdev", 'forced by sensors.input.backend = "evdev"'),
        id="env-auto-defers-to-config",
    ),
    pytest.param(
        "auto", {"WAYLAND_DISPLAY": "wayland-0", "MAILPUSH_INPUT_BACKEND": "pynput"}, "linux",
        None, None,
        Choice(
            "pynput",
            "forced by MAILPUSH_INPUT_BACKEND=pynput",
            "pynput is forced in a Wayland session (WAYLAND_DISPLAY is set): "
            "it sees only input to XWayland windows",
        ),
        id="env-forces-pynput-under-wayland",
    ),
    pytest.param(
        "auto", {"MAILPUSH_INPUT_BACKEND": "uinput"}, "linux", None, None,
        Choice(None, "MAILPUSH_INPUT_BACKEND='uinput' is invalid; set it to one of auto, pynput, evdev"),
        id="env-invalid",
    ),
    pytest.param(
        "evdev", {}, "darwin", None, None,
        Choice(None, "the evdev backend works on Linux only, not on darwin"),
        id="evdev-forced-off-linux",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("configured", "env", "platform", "evdev", "x", "expected"), CASES)
def test_choose_backend(configured, env, platform, evdev, x, expected):
    choice = choose_backend(configured, env, platform, Probe(evdev), Probe(x))

    assert choice == expected


def test_display_probed_only_when_evdev_fails():
    evdev_probe, x_probe = Probe(None), Probe(None)

    choose_backend("auto", X11, "linux", evdev_probe, x_probe)

    assert evdev_probe.calls == 1
    assert x_probe.calls == 0


def test_forced_backend_probes_nothing():
    evdev_probe, x_probe = Probe(None), Probe(None)

    choose_backend("auto", {"MAILPUSH_INPUT_BACKEND": "pynput"}, "linux", evdev_probe, x_probe)

    assert evdev_probe.calls == 0
    assert x_probe.calls == 0


def test_permission_reason_names_path_and_fix(monkeypatch):
    monkeypatch.setenv("LOGNAME", "alice")

    reason = permission_reason("/dev/input/event3")

    assert reason == (
        "permission denied on /dev/input/event3: add the user to the input group "
        "(sudo usermod -aG input alice) and log in again"
    )
