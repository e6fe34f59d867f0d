"""The service config: embedded defaults and one-line errors."""

import pytest

from mailpush.errors import ConfigError
from mailpush.server.config import ImapMailbox, MaildirMailbox, build_config, load_config


def test_no_file_means_embedded_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("MAILPUSH_USER", "Alice Smith")

    config = load_config(None)

    assert config.embedded
    assert config.broker.listen == "127.0.0.1:1883"
    assert [user.id for user in config.users] == ["alice-smith"]
    mailbox = config.users[0].mailbox
    assert isinstance(mailbox, MaildirMailbox)
    assert mailbox.path == tmp_path / "data" / "mailpush" / "Maildir"


def test_full_config_parses(tmp_path):
    config = build_config(
        {
            "broker": {"url": "mqtt://127.0.0.1:1884"},
            "service": {"probe_timeout_ms": 500, "state_dir": str(tmp_path)},
            "users": [
                {"id": "alice", "mailbox": {"kind": "maildir", "path": str(tmp_path / "m")}},
                {
                    "id": "bob",
                    "report_mode": "probe",
                    "mailbox": {
                        "kind": "imap",
                        "host": "imap.example.org",
                        "username": "bob",
                        "password_env": "X",
                    },
                },
            ],
        }
    )

    assert not config.embedded
    assert config.address.port == 1884
    assert config.service.probe_timeout_ms == 500
    assert config.state_dir == tmp_path
    assert isinstance(config.users[1].mailbox, ImapMailbox)
    assert config.users[1].report_mode == "probe"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"brokers": {}}, "brokers: unknown key"),
        ({"broker": {"url": "tcp://x"}}, "broker.url: invalid URL 'tcp://x'"),
        ({"broker": {"port": 1}}, "broker.port: unknown key"),
        ({"broker": {"listen": "1883"}}, "broker.listen: invalid value '1883'"),
        (
            {"service": {"probe_timeout_ms": "300"}},
            "service.probe_timeout_ms: invalid value '300'; expected an integer",
        ),
        ({"service": {"stale_after_s": -1}}, "service.stale_after_s: invalid value -1"),
        ({"service": {"instance": "Main"}}, "service.instance: invalid id 'Main'"),
        (
            {"service": {"instance": "b"}},
            "service.instance is 'b' but broker.url is not set: instances on embedded brokers",
        ),
        ({"users": []}, "users: expected one or more [[users]] tables"),
        ({"users": [{"mailbox": {}}]}, "users[0].id: missing"),
        ({"users": [{"id": "al/ice"}]}, "users[0].id: invalid id 'al/ice'"),
        ({"users": [{"id": "a"}, {"id": "a"}]}, "users: user id 'a' appears twice"),
        (
            {"users": [{"id": "a", "report_mode": "push"}]},
            "users[0].report_mode: invalid value 'push'",
        ),
        (
            {"users": [{"id": "a", "mailbox": {"kind": "pop3"}}]},
            "users[0].mailbox.kind: invalid value 'pop3'",
        ),
        (
            {"users": [{"id": "a", "mailbox": {"kind": "maildir"}}]},
            "users[0].mailbox.path: missing",
        ),
        (
            {"users": [{"id": "a", "mailbox": {"kind": "imap", "host": "h"}}]},
            "users[0].mailbox.username: missing",
        ),
        (
            {
                "users": [
                    {
                        "id": "a",
                        "mailbox": {"kind": "imap", "host": "h", "username": "u", "port": "143"},
                    }
                ]
            },
            "users[0].mailbox.port: invalid value '143'",
        ),
        (
            {
                "users": [
                    {
                        "id": "a",
                        "mailbox": {
                            "kind": "imap",
                            "host": "h",
                            "username": "u",
                            "tls": True,
                            "starttls": True,
                        },
                    }
                ]
            },
            "users[0].mailbox: tls and starttls are both set",
        ),
        (
            {
                "users": [
                    {
                        "id": "a",
                        "mailbox": {"kind": "imap", "host": "h", "username": "u", "pasword": "x"},
                    }
                ]
            },
            "users[0].mailbox.pasword: unknown key",
        ),
    ],
)
def test_bad_config_is_one_line(data, expected):
    with pytest.raises(ConfigError) as caught:
        build_config(data)

    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message
    assert caught.value.exit_code == 2


def test_imap_password_never_inline(tmp_path):
    config = build_config(
        {"users": [{"id": "a", "mailbox": {"kind": "imap", "host": "h", "username": "u"}}]}
    )

    with pytest.raises(ConfigError) as caught:
        config.users[0].mailbox.imap_config()

    assert "no password source" in str(caught.value)


def test_embedded_broker_refuses_open_listen(tmp_path):
    from mailpush.server.service import PushService

    maildir = tmp_path / "Maildir"
    config = build_config(
        {
            "broker": {"listen": "0.0.0.0:1883"},
            "service": {"state_dir": str(tmp_path / "state")},
            "users": [{"id": "a", "mailbox": {"kind": "maildir", "path": str(maildir)}}],
        }
    )
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)

    with pytest.raises(ConfigError) as caught:
        PushService(config).run()

    assert "broker.listen: '0.0.0.0' is not a loopback address" in str(caught.value)
    assert "broker.accounts_file" in str(caught.value)
