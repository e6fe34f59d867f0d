"""Tests of the power sensor plugin and of the display facts it reports."""

import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from mailpush.errors import ConfigError, SensorError
from mailpush.sensors.base import Health, Mode, Reading
from mailpush.sensors.display import describe_screen, query_x11_display
from mailpush.sensors.power import PowerSensor, infer_capabilities
from mailpush.sensors.registry import discover

try:  # psutil 7 moved its named tuples out of _common
    from psutil._ntuples import sbattery
except ImportError:  # pragma: no cover - psutil before 7
    from psutil._common import sbattery

NO_DISPLAY: Any = lambda name: None  # noqa: E731 - a headless terminal
COLOR_SCREEN = {"width": 1920, "height": 1080, "color": True}


def scripted(*batteries: Any) -> Any:
    """Return a ``sensors_battery`` stand-in that returns each battery in turn, then the last."""
    queue = list(batteries)

    def sensors_battery() -> Any:
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return sensors_battery


def power_supply(tmp_path: Path, **supplies: tuple[str, str | None]) -> Path:
    """Build a /sys/class/power_supply tree: name=(type, scope or None)."""
    root = tmp_path / "power_supply"
    root.mkdir()
    for name, (kind, scope) in supplies.items():
        (root / name).mkdir()
        (root / name / "type").write_text(kind + "\n")
        if scope is not None:
            (root / name / "scope").write_text(scope + "\n")
    return root


def sensor(tmp_path: Path, battery: Any, **kwargs: Any) -> PowerSensor:
    """Return a PowerSensor on a laptop-like sysfs tree, with no display unless given."""
    if "power_supply_dir" not in kwargs:
        kwargs["power_supply_dir"] = power_supply(tmp_path, BAT0=("Battery", None))
    kwargs.setdefault("device_tree_model", tmp_path / "no-device-tree")
    kwargs.setdefault("query_display", NO_DISPLAY)
    options = kwargs.pop("options", None)
    plugin = PowerSensor(options, sensors_battery=scripted(battery), **kwargs)
    plugin.start(lambda: None)
    return plugin


def test_power_registered_as_plugin() -> None:
    entry = discover()["power"]

    assert entry.plugin is PowerSensor
    assert PowerSensor.mode is Mode.POLLED


def test_power_discharging(tmp_path: Path) -> None:
    plugin = sensor(tmp_path, sbattery(percent=55.52, secsleft=3600, power_plugged=False))

    reading = plugin.read()

    assert reading.on_battery is True
    assert reading.plugged is False
    assert reading.battery_percent == 55.5
    assert reading.details["secsleft"] == 3600
    assert plugin.status().health is Health.OK


def test_power_charging_unlimited(tmp_path: Path) -> None:
    battery = sbattery(percent=80, secsleft=psutil.POWER_TIME_UNLIMITED, power_plugged=True)
    plugin = sensor(tmp_path, battery)

    reading = plugin.read()

    assert reading.on_battery is False
    assert reading.plugged is True
    assert reading.battery_percent == 80.0
    assert reading.details["secsleft"] is None


def test_power_unknown_plug_state(tmp_path: Path) -> None:
    battery = sbattery(percent=42.0, secsleft=psutil.POWER_TIME_UNKNOWN, power_plugged=None)
    plugin = sensor(tmp_path, battery)

    reading = plugin.read()

    assert reading.on_battery is None
    assert reading.plugged is None
    assert reading.battery_percent == 42.0
    assert reading.details["secsleft"] is None


def test_power_percent_clamped(tmp_path: Path) -> None:
    # psutil divides energy_now by energy_full, which a worn battery can exceed.
    plugin = sensor(tmp_path, sbattery(percent=103.7, secsleft=10, power_plugged=False))

    assert plugin.read().battery_percent == 100.0


def test_power_desktop_without_battery(tmp_path: Path) -> None:
    plugin = sensor(tmp_path, None, power_supply_dir=power_supply(tmp_path))

    reading = plugin.read()

    assert reading.on_battery is None
    assert reading.battery_percent is None
    assert reading.plugged is None
    assert plugin.attributes()["kind"] == "desktop"
    assert plugin.status().health is Health.OK


def test_power_ignores_mouse_battery(tmp_path: Path) -> None:
    supplies = power_supply(tmp_path, hidpp_battery_0=("Battery", "Device"), AC=("Mains", None))
    battery = sbattery(percent=55, secsleft=psutil.POWER_TIME_UNKNOWN, power_plugged=False)
    plugin = sensor(tmp_path, battery, power_supply_dir=supplies)

    reading = plugin.read()

    assert reading == Reading(details={"battery": "none"})
    assert plugin.attributes()["kind"] == "desktop"


def test_power_laptop_with_mouse_battery(tmp_path: Path) -> None:
    supplies = power_supply(
        tmp_path, BAT0=("Battery", "System"), hidpp_battery_0=("Battery", "Device")
    )
    plugin = sensor(tmp_path, sbattery(70, 5000, False), power_supply_dir=supplies)

    assert plugin.read().battery_percent == 70.0
    assert plugin.attributes()["kind"] == "laptop"


def test_power_read_error(tmp_path: Path) -> None:
    plugin = PowerSensor(
        sensors_battery=scripted(OSError(5, "Input/output error"), sbattery(90, 100, False)),
        power_supply_dir=power_supply(tmp_path, BAT0=("Battery", None)),
        query_display=NO_DISPLAY,
    )

    with pytest.raises(SensorError, match="reading the battery failed"):
        plugin.read()
    assert plugin.status().health is Health.ERROR

    assert plugin.read().battery_percent == 90.0
    assert plugin.status().health is Health.OK


def test_power_without_psutil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)  # makes `import psutil` fail
    plugin = PowerSensor(query_display=NO_DISPLAY, device_tree_model=tmp_path / "none")

    plugin.start(lambda: None)
    reading = plugin.read()

    assert plugin.status().health is Health.UNAVAILABLE
    assert "pip install psutil" in plugin.status().reason
    assert reading == Reading()
    assert plugin.attributes()["kind"] == "desktop"


def test_power_platform_without_battery_support(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare_psutil = SimpleNamespace(POWER_TIME_UNKNOWN=-1, POWER_TIME_UNLIMITED=-2)
    monkeypatch.setitem(sys.modules, "psutil", bare_psutil)
    plugin = PowerSensor(query_display=NO_DISPLAY, device_tree_model=tmp_path / "none")

    plugin.start(lambda: None)

    assert plugin.read() == Reading()
    assert plugin.status().health is Health.DEGRADED


def test_power_real_psutil() -> None:
    plugin = PowerSensor(query_display=NO_DISPLAY)
    plugin.start(lambda: None)

    reading = plugin.read()

    if psutil.sensors_battery() is None:
        assert reading.battery_percent is None
        assert reading.on_battery is None
    else:
        assert reading.battery_percent is not None
        assert 0.0 <= reading.battery_percent <= 100.0
    assert plugin.status().health is Health.OK


@pytest.mark.parametrize(
    ("model", "battery", "kind"),
    [
        (b"Raspberry Pi 4 Model B Rev 1.4\x00", None, "pi"),
        (b"Raspberry Pi Zero 2 W Rev 1.0\x00", sbattery(60, 900, False), "pi"),
        (b"Pine64 PinePhone (1.2)\x00", sbattery(60, 900, False), "laptop"),
        (None, sbattery(60, 900, False), "laptop"),
        (None, None, "desktop"),
    ],
    ids=["pi", "pi-on-ups-hat", "other-board-with-battery", "laptop", "desktop"],
)
def test_power_kind_guess(tmp_path: Path, model: bytes | None, battery: Any, kind: str) -> None:
    device_tree = tmp_path / "model"
    if model is not None:
        device_tree.write_bytes(model)
    plugin = sensor(tmp_path, battery, device_tree_model=device_tree)

    assert plugin.attributes()["kind"] == kind


def test_power_kind_option_wins(tmp_path: Path) -> None:
    options = PowerSensor.parse_options({"kind": "tablet", "name": "Kitchen tablet"})
    plugin = sensor(tmp_path, sbattery(60, 900, False), options=options)

    attributes = plugin.attributes()

    assert attributes["kind"] == "tablet"
    assert attributes["name"] == "Kitchen tablet"


def test_power_name_defaults_to_hostname(tmp_path: Path) -> None:
    plugin = sensor(tmp_path, None)

    assert plugin.attributes()["name"] == socket.gethostname()


def test_power_headless_attributes(tmp_path: Path) -> None:
    plugin = sensor(tmp_path, None)

    attributes = plugin.attributes()

    assert attributes["display"] is None
    assert attributes["capabilities"] == []


def test_power_display_attributes(tmp_path: Path) -> None:
    requested: list[str] = []

    def query(name: str) -> Any:
        requested.append(name)
        return COLOR_SCREEN

    options = PowerSensor.parse_options({"x_display": ":7"})
    plugin = sensor(tmp_path, None, options=options, query_display=query)

    attributes = plugin.attributes()

    assert requested == [":7"]
    assert attributes["display"] == COLOR_SCREEN
    assert attributes["capabilities"] == ["images", "html", "color"]


def test_power_capabilities_option_wins(tmp_path: Path) -> None:
    options = PowerSensor.parse_options({"capabilities": ["images", "sound"]})
    plugin = sensor(tmp_path, None, options=options, query_display=lambda name: COLOR_SCREEN)

    assert plugin.attributes()["capabilities"] == ["images", "sound"]


def test_infer_capabilities_gray_screen() -> None:
    gray = {"width": 296, "height": 128, "color": False}

    assert infer_capabilities(gray) == ["images", "html"]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"kind": "toaster"}, "sensors.power.kind: invalid value 'toaster'"),
        ({"capabilities": ["smell"]}, "sensors.power.capabilities: invalid value"),
        ({"name": 3}, "sensors.power.name: invalid value 3; expected a string"),
        ({"colour": True}, "sensors.power.colour: unknown key"),
    ],
)
def test_power_options_rejected(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PowerSensor.parse_options(table)


def fake_screen(depth: int, visual_class: int) -> Any:
    """Build the parts of an Xlib screen that describe_screen reads."""
    root_visual = SimpleNamespace(visual_id=0x21, visual_class=visual_class)
    other_visual = SimpleNamespace(visual_id=0x22, visual_class=4)
    return SimpleNamespace(
        width_in_pixels=1366,
        height_in_pixels=768,
        root_depth=depth,
        root_visual=0x21,
        allowed_depths=[
            SimpleNamespace(depth=1, visuals=[]),
            SimpleNamespace(depth=depth, visuals=[other_visual, root_visual]),
        ],
    )


@pytest.mark.parametrize(
    ("depth", "visual_class", "color"),
    [(24, 4, True), (8, 3, True), (8, 1, False), (8, 0, False), (1, 4, False)],
    ids=["truecolor", "pseudocolor", "grayscale", "staticgray", "monochrome"],
)
def test_describe_screen(depth: int, visual_class: int, color: bool) -> None:
    facts = describe_screen(fake_screen(depth, visual_class))

    assert facts == {"width": 1366, "height": 768, "color": color}


def test_query_display_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)

    assert query_x11_display("") is None


def test_query_display_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Display 1999 has no socket in /tmp/.X11-unix, and python-xlib's fallback,
    # TCP port 7999 on loopback, has no listener on a test machine.
    monkeypatch.setenv("XAUTHORITY", str(tmp_path / "none"))

    with caplog.at_level(logging.WARNING, logger="mailpush.sensors.display"):
        assert query_x11_display(":1999") is None

    assert "cannot connect to X display ':1999'" in caplog.text


@pytest.fixture(scope="module")
def xvfb() -> Iterator[Any]:
    """Start Xvfb servers on free display numbers; stop every one at the end."""
    if shutil.which("Xvfb") is None:
        pytest.fail("Xvfb not found; install the Debian package xvfb")
    servers: list[subprocess.Popen[bytes]] = []

    def start(*screen_args: str) -> str:
        read_end, write_end = os.pipe()
        args = ["Xvfb", "-displayfd", str(write_end), "-nolisten", "tcp", *screen_args]
        server = subprocess.Popen(args, pass_fds=(write_end,), stderr=subprocess.DEVNULL)
        servers.append(server)
        os.close(write_end)
        try:
            return ":" + _read_display_number(read_end, server)
        finally:
            os.close(read_end)

    yield start

    for server in servers:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _read_display_number(fd: int, server: subprocess.Popen[bytes]) -> str:
    """Read the display number Xvfb writes to -displayfd once it accepts clients."""
    deadline = time.monotonic() + 30
    received = b""
    while not received.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or server.poll() is not None:
            pytest.fail(f"Xvfb did not report a display within 30 s (exit code {server.poll()})")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 16)
            if not chunk:
                pytest.fail(f"Xvfb closed -displayfd without a display (exit {server.wait()})")
            received += chunk
    return received.decode().strip()


@pytest.mark.integration
def test_query_display_xvfb_color(xvfb: Any) -> None:
    display = xvfb("-screen", "0", "1024x768x24")

    assert query_x11_display(display) == {"width": 1024, "height": 768, "color": True}


@pytest.mark.integration
def test_query_display_xvfb_gray(xvfb: Any) -> None:
    display = xvfb("-screen", "0", "640x480x8", "-cc", "1")  # -cc 1: GrayScale root visual

    assert query_x11_display(display) == {"width": 640, "height": 480, "color": False}


@pytest.mark.integration
def test_power_attributes_xvfb(xvfb: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPLAY", xvfb("-screen", "0", "800x600x24"))
    plugin = PowerSensor(
        sensors_battery=scripted(None),
        power_supply_dir=power_supply(tmp_path),
        device_tree_model=tmp_path / "none",
    )

    attributes = plugin.attributes()

    assert attributes["display"] == {"width": 800, "height": 600, "color": True}
    assert attributes["capabilities"] == ["images", "html", "color"]
    assert attributes["kind"] == "desktop"
