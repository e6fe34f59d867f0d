"""Agent config: defaults, validation messages, overrides."""

import pytest

from mailpush.agent.config import build_config, load_config
from mailpush.errors import ConfigError, InvalidIdError
from mailpush.sensors.registry import discover

PLUGINS = discover()


def build(data, **overrides):
    return build_config(data, PLUGINS, overrides=overrides)


def test_minimal_config_gets_defaults():
    config = build({"user": "alice", "terminal": "desk"})

    assert config.address.host == "127.0.0.1"
    assert config.address.port == 1883
    assert config.address.tls is False
    assert config.fusion.active_window_s == 120
    assert config.fusion.away_after_s == 600
    assert config.heartbeat_s == 60
    assert config.sensors["input"].enabled is True
    assert config.sensors["power"].enabled is True


def test_flags_override_file():
    config = build(
        {"user": "alice", "terminal": "desk", "broker": {"url": "mqtt://10.0.0.1:1883"}},
        user="bob",
        broker="mqtts://broker.example:8884",
    )

    assert config.user == "bob"
    assert config.terminal == "desk"
    assert str(config.address) == "mqtts://broker.example:8884"
    assert config.address.tls is True


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"user": "Alice", "terminal": "desk"}, "user: invalid id 'Alice'"),
        ({"user": "al/ice", "terminal": "desk"}, "user: invalid id 'al/ice'"),
        ({"user": "alice", "terminal": "de+sk"}, "terminal: invalid id 'de+sk'"),
        ({"user": "alice", "terminal": "#"}, "terminal: invalid id '#'"),
        ({"user": "alice", "terminal": ""}, "terminal: invalid id ''"),
        ({"user": "a\x00", "terminal": "desk"}, "user: invalid id 'a\\x00'"),
        ({"user": "x" * 65, "terminal": "desk"}, "user: invalid id"),
        ({"user": 7, "terminal": "desk"}, "user: invalid id 7"),
    ],
)
def test_invalid_ids_rejected(data, expected):
    with pytest.raises(InvalidIdError) as caught:
        build(data)

    message = str(caught.value)
    assert message.startswith(expected)
    assert "a-z, 0-9" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"terminal": "desk"}, "user: missing; set it in the config file or pass --user"),
        ({"user": "a", "terminal": "b", "colour": 1}, "colour: unknown key"),
        ({"user": "a", "terminal": "b", "broker": {"host": "x"}}, "broker.host: unknown key"),
        (
            {"user": "a", "terminal": "b", "broker": {"url": "http://x"}},
            "broker.url: invalid URL 'http://x'",
        ),
        (
            {"user": "a", "terminal": "b", "broker": {"url": "mqtt://u:p@x:1"}},
            "broker.url: credentials",
        ),
        (
            {"user": "a", "terminal": "b", "broker": {"url": "mqtt://x:99999"}},
            "broker.url: invalid URL",
        ),
        (
            {"user": "a", "terminal": "b", "broker": {"keepalive_s": "60"}},
            "broker.keepalive_s: invalid value '60'; expected an integer",
        ),
        (
            {"user": "a", "terminal": "b", "broker": {"protocol": "4"}},
            "broker.protocol: invalid value '4'; expected one of 'auto', '5', '3.1.1'",
        ),
        (
            {"user": "a", "terminal": "b", "fusion": {"active_window_s": "2m"}},
            "fusion.active_window_s: invalid value '2m'; expected a finite number",
        ),
        (
            {"user": "a", "terminal": "b", "fusion": {"heartbeat_s": 0}},
            "fusion.heartbeat_s: invalid value 0",
        ),
        ({"user": "a", "terminal": "b", "fusion": {"speed": 1}}, "fusion.speed: unknown key"),
        (
            {"user": "a", "terminal": "b", "sensors": {"sonar": {}}},
            "sensors.sonar: no sensor plugin named 'sonar' is installed",
        ),
        (
            {"user": "a", "terminal": "b", "sensors": {"input": {"enabled": "yes"}}},
            "sensors.input.enabled: invalid value 'yes'",
        ),
        (
            {"user": "a", "terminal": "b", "sensors": {"input": {"backend": "wayland"}}},
            "sensors.input.backend: invalid value 'wayland'",
        ),
        (
            {"user": "a", "terminal": "b", "sensors": {"power": {"kind": "toaster"}}},
            "sensors.power.kind: invalid value 'toaster'",
        ),
        ({"user": "a", "terminal": "b", "broker": "mqtt://x"}, "broker: expected a table"),
    ],
)
def test_bad_config_is_one_line(data, expected):
    with pytest.raises(ConfigError) as caught:
        build(data)

    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message
    assert caught.value.exit_code == 2


def test_sensor_can_be_disabled():
    config = build({"user": "a", "terminal": "b", "sensors": {"input": {"enabled": False}}})

    assert config.sensors["input"].enabled is False
    assert config.sensors["power"].enabled is True


def test_missing_file_names_fix(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "agent.toml", PLUGINS)

    assert "config file not found" in str(caught.value)
    assert "mailpush-agent config init" in str(caught.value)


def test_invalid_toml_names_line(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('user = "alice"\nterminal = desk\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path, PLUGINS)

    assert str(caught.value).startswith(f"{path}: invalid TOML")
    assert "line 2" in str(caught.value)


def test_password_file_readable_by_others_rejected(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    config = build({"user": "a", "terminal": "b", "broker": {"password_file": str(secret)}})

    with pytest.raises(ConfigError) as caught:
        config.broker.password()

    assert f"chmod 600 {secret}" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_password_sources(tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.write_text("hunter2\n")
    secret.chmod(0o600)
    monkeypatch.setenv("MP_TEST_PASSWORD", "from-env")

    from_file = build({"user": "a", "terminal": "b", "broker": {"password_file": str(secret)}})
    from_env = build({"user": "a", "terminal": "b", "broker": {"password_env": "MP_TEST_PASSWORD"}})
    from_command = build(
        {"user": "a", "terminal": "b", "broker": {"password_command": ["echo", "from-cmd"]}}
    )

    assert from_file.broker.password() == "hunter2"
    assert from_env.broker.password() == "from-env"
    assert from_command.broker.password() == "from-cmd"


def test_enabled_temperature_needs_bus():
    with pytest.raises(ConfigError) as caught:
        build({"user": "a", "terminal": "b", "sensors": {"temperature": {"enabled": True}}})

    assert str(caught.value).startswith("sensors.temperature.bus: missing; set bus = 1")


def test_disabled_temperature_needs_nothing():
    config = build({"user": "a", "terminal": "b"})

    assert config.sensors["temperature"].enabled is False


def test_zone_from_position_table():
    config = build({"user": "a", "terminal": "b", "position": {"zone": "study"}})

    assert config.zone == "study"


def test_zone_from_pir_options():
    config = build({"user": "a", "terminal": "b", "sensors": {"pir": {"pin": 17, "zone": "hall"}}})

    assert config.zone == "hall"


def test_zone_invalid():
    with pytest.raises(ConfigError) as caught:
        build({"user": "a", "terminal": "b", "position": {"zone": ""}})

    assert str(caught.value).startswith("position.zone: invalid value ''")


def test_password_file_group_readable_allowed(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("hunter2\n")
    secret.chmod(0o640)  # root:mailpush 0640, as a system service reads it
    config = build({"user": "a", "terminal": "b", "broker": {"password_file": str(secret)}})

    assert config.broker.password() == "hunter2"


def test_account_of_other_terminal_rejected():
    with pytest.raises(ConfigError) as caught:
        build({"user": "alice", "terminal": "desk", "broker": {"username": "alice.phone"}})

    message = str(caught.value)
    assert message.startswith("broker.username: 'alice.phone' is the account of terminal alice/phone")
    assert "use alice.desk" in message


def test_own_or_foreign_username_accepted():
    own = build({"user": "alice", "terminal": "desk", "broker": {"username": "alice.desk"}})
    other_scheme = build({"user": "alice", "terminal": "desk", "broker": {"username": "emqx-user"}})

    assert own.broker.username == "alice.desk"
    assert other_scheme.broker.username == "emqx-user"
