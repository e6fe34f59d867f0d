"""Bugs the fuzzing found, each kept as the smallest input that showed it."""

import json
import subprocess

import pytest

from mailpush.agent import config as agent_config
from mailpush.errors import ConfigError, PayloadError
from mailpush.protocol.messages import (
    MAX_PAYLOAD_BYTES,
    MailStatus,
    Push,
    UsageState,
    decode,
    encode,
)
from mailpush.protocol.policy import parse_policy_bytes, policy_from_toml_dict
from mailpush.sensors.registry import discover
from mailpush.server import config as server_config
from mailpush.server.summary import summarize
from tests.processes import SERVER, home_env
from tests.test_fuzz_mime import multipart
from tests.test_fuzz_payloads import assert_one_line

STATE = {
    "v": 1, "user": "alice", "terminal": "desk", "state": "idle",
    "since": 1.0, "ts": 2.0, "seq": 3, "confidence": 0.5,
}  # fmt: skip


@pytest.mark.parametrize("field", ["user", "terminal"])
def test_id_with_trailing_newline_rejected(field):
    # msgspec applies the pattern with re.search, where "$" also matches before a final "\n".
    payload = json.dumps({**STATE, field: "desk\n"}).encode()

    with pytest.raises(PayloadError) as caught:
        decode(payload, UsageState)

    assert_one_line(str(caught.value), "UsageState: ")


def test_mailstatus_by_with_newline_rejected():
    payload = b'{"v": 1, "mail": "m1", "seen": true, "by": "desk\\n", "ts": 1}'

    with pytest.raises(PayloadError):
        decode(payload, MailStatus)


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_deeply_nested_json_is_payload_error(opening):
    depth = 5_000
    closing = "]" if opening == "[" else "}"
    inner = "1" if opening != "[" else ""
    nested = opening * depth + inner + closing * depth
    payload = f'{{"v": 1, "id": "a", "ts": 1, "unknown": {nested}}}'.encode()
    assert len(payload) < MAX_PAYLOAD_BYTES

    with pytest.raises(PayloadError) as caught:  # RecursionError escapes decode() instead
        decode(payload, Push)

    assert_one_line(str(caught.value), "Push: ")


def test_rule_name_line_break_one_line_payload():
    payload = b'{"v":1,"updated":1,"set_by":"d","rules":[{"name":"a\\nb","select":"bad"}]}'

    with pytest.raises(PayloadError) as caught:
        parse_policy_bytes(payload)

    assert_one_line(str(caught.value), "Policy: ")


def test_rule_name_line_break_one_line_file():
    with pytest.raises(ConfigError) as caught:
        policy_from_toml_dict({"rules": [{"name": "a\r\nb", "select": "bad"}]}, "d", 1.0)

    assert_one_line(str(caught.value), "rules[0] ")


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"fusion": {"heartbeat_s": float("nan")}}, "fusion.heartbeat_s"),
        ({"fusion": {"active_window_s": float("nan")}}, "fusion.active_window_s"),
        ({"fusion": {"away_after_s": float("nan")}}, "fusion.away_after_s"),
    ],
)
def test_agent_nan_rejected(table, key):
    with pytest.raises(ConfigError) as caught:
        agent_config.build_config({"user": "a", "terminal": "b", **table}, discover())

    assert_one_line(str(caught.value), f"{key}: ")


@pytest.mark.parametrize(
    "key", ["stale_after_s", "probe_after_s", "resend_after_s", "outbox_ttl_s"]
)
def test_server_nan_rejected(key):
    with pytest.raises(ConfigError) as caught:
        server_config.build_config({"service": {key: float("nan")}})

    assert_one_line(str(caught.value), f"service.{key}: ")


def test_ca_file_line_break_one_line():
    document = {"user": "a", "terminal": "b", "broker": {"ca_file": "ca\n.pem"}}

    with pytest.raises(ConfigError) as caught:
        agent_config.build_config(document, discover())

    assert_one_line(str(caught.value), "broker.ca_file: ")


def _push_size(parts: list[list[bytes]]) -> int:
    raw = b"\r\n".join([b"Subject: many", b"MIME-Version: 1.0", *multipart(parts, "m", "mixed")])
    summary = summarize(raw, "m1", seen=False)
    return len(encode(Push(id="p", kind="mail", mail=summary, ts=1.0)))


def test_long_attachment_types_fit_a_push():
    parts = [
        [f"Content-Type: application/x-{'y' * 4000}".encode(),
         f'Content-Disposition: attachment; filename="{index}.bin"'.encode(), b"", b"data"]
        for index in range(100)
    ]  # fmt: skip

    assert _push_size(parts) <= MAX_PAYLOAD_BYTES


def test_long_multibyte_attachment_names_fit_a_push():
    name = "文" * 990
    parts = [
        [b"Content-Type: application/octet-stream",
         f"Content-Disposition: attachment; filename*=utf-8''{name}{index}".encode(), b"", b"x"]
        for index in range(100)
    ]  # fmt: skip

    assert _push_size(parts) <= MAX_PAYLOAD_BYTES


def test_deep_mime_keeps_headers():
    lines = [b"Content-Type: text/plain", b"", b"innermost"]
    for level in range(2_000):
        lines = multipart([lines], f"d{level}", "mixed")
    raw = b"\r\n".join([b"From: ann@example.org", b"Subject: deep", b"MIME-Version: 1.0", *lines])

    summary = summarize(raw, "deep-1", seen=False)

    assert summary.subject == "deep"
    assert summary.sender == "ann@example.org"


def test_server_broker_flag_with_broker_string(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text('broker = "x"\n')

    result = subprocess.run(
        [SERVER, "config", "show", "--config", str(config), "--broker", "mqtt://127.0.0.1:1"],
        env=home_env(tmp_path),
        capture_output=True,
        text=True,
    )

    assert result.returncode == 2, result.stderr  # a TypeError traceback and exit 1 instead
    assert "Traceback" not in result.stderr
    assert "broker: expected a table" in result.stderr
