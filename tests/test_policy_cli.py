"""The `mailpush-agent policy` commands as a user types them, against a real Mosquitto."""

import json
import re
import subprocess
import sys
import time
import tomllib
from email.message import EmailMessage
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mailpush.agent.policy_inputs import mail_traits_from_eml
from mailpush.server.summary import summarize
from tests.fixtures.mosquitto import free_port
from tests.mqtt_client import Subscriber
from tests.processes import AGENT, home_env

POLICY_TOPIC = "mailpush/v1/alice/policy"

VALID_FILE = """\
# photos to a colour screen
fallback = "none"

[[rules]]
name = "photos"
match = { has_images = true }
require = ["images"]
select = "closest"
prompt_others = true

[[rules]]
name = "rest"
select = "most-active"
"""


@pytest.fixture
def agent_config(tmp_path, mosquitto):
    folder = tmp_path / "agent"
    folder.mkdir()
    path = folder / "agent.toml"
    path.write_text(f'user = "alice"\nterminal = "desk"\n[broker]\nurl = "{mosquitto.url}"\n')
    return path


def policy_command(tmp_path, config, *arguments, env_extra=None, stdin=None):
    env = {**home_env(tmp_path / "home"), **(env_extra or {})}
    return subprocess.run(
        [AGENT, "policy", *arguments, "--config", str(config)],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def error_lines(result):
    # Sensor plugins that cannot load on this machine warn on stderr; that is not our error.
    return [line for line in result.stderr.splitlines() if "WARNING" not in line]


def retained_policy(port, timeout=3.0):
    """Return the retained policy payload as a third-party client sees it, or None."""
    subscriber = Subscriber(port, POLICY_TOPIC)
    try:
        message = subscriber.wait_for(lambda m: True, timeout=timeout)
    except AssertionError:
        return None
    finally:
        subscriber.close()
    assert message.retain
    return json.loads(message.payload)


def write_editor(tmp_path, *texts):
    """Write an $EDITOR script that writes ``texts[n]`` into the file on its n-th call."""
    drafts = []
    for index, text in enumerate(texts):
        draft = tmp_path / f"draft-{index}.toml"
        draft.write_text(text)
        drafts.append(str(draft))
    script = tmp_path / "editor.py"
    counter = tmp_path / "editor-calls"
    script.write_text(
        "import pathlib, shutil, sys\n"
        f"counter = pathlib.Path({str(counter)!r})\n"
        "calls = int(counter.read_text()) if counter.exists() else 0\n"
        "counter.write_text(str(calls + 1))\n"
        f"drafts = {drafts!r}\n"
        "shutil.copyfile(drafts[min(calls, len(drafts) - 1)], sys.argv[1])\n"
    )
    return f"{sys.executable} {script}", counter


# ---------------------------------------------------------------- show and set


def test_show_without_policy_prints_default(tmp_path, agent_config):
    result = policy_command(tmp_path, agent_config, "show", "--wait", "0.5")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no policy set; the service uses the default:")
    assert 'select = "most-active"' in result.stdout
    assert 'name = "default"' in result.stdout


def test_set_preset_publishes_retained(tmp_path, agent_config, mosquitto):
    before = time.time()

    result = policy_command(tmp_path, agent_config, "set", "--prefer", "laptop")
    published = retained_policy(mosquitto.port)

    assert result.returncode == 0, result.stderr
    assert "published the policy of alice (2 rules, fallback all)" in result.stdout
    assert published is not None
    assert published["set_by"] == "desk"
    assert before - 1 <= published["updated"] <= time.time() + 1
    assert [rule["select"] for rule in published["rules"]] == ["prefer:laptop", "most-active"]
    assert all(rule["prompt_others"] for rule in published["rules"])
    assert published["fallback"] == "all"


def test_set_saves_local_file_beside_config(tmp_path, agent_config):
    result = policy_command(
        tmp_path, agent_config, "set", "--kinds", "phone+laptop", "--no-prompt-others"
    )

    local = agent_config.parent / "policy.toml"
    assert result.returncode == 0, result.stderr
    saved = tomllib.loads(local.read_text())
    assert saved["fallback"] == "all"
    assert saved["rules"][0] == {
        "name": "kinds phone+laptop",
        "select": "kinds:phone+laptop",
        "prompt_others": False,
    }


def test_show_after_set_names_who_and_when(tmp_path, agent_config):
    policy_file = tmp_path / "mine.toml"
    policy_file.write_text(VALID_FILE)
    set_result = policy_command(tmp_path, agent_config, "set", str(policy_file))

    shown = policy_command(tmp_path, agent_config, "show")
    as_json = policy_command(tmp_path, agent_config, "show", "--json")

    assert set_result.returncode == 0, set_result.stderr
    assert shown.returncode == 0, shown.stderr
    first_line = shown.stdout.splitlines()[0]
    assert first_line.startswith("policy of alice, set by desk on ")
    assert time.strftime("%Y-%m-%d") in first_line
    assert "match = { has_images = true }" in shown.stdout
    assert 'require = ["images"]' in shown.stdout
    assert 'fallback = "none"' in shown.stdout
    data = json.loads(as_json.stdout)
    assert data["source"] == "broker"
    assert data["policy"]["set_by"] == "desk"
    assert [rule["name"] for rule in data["policy"]["rules"]] == ["photos", "rest"]
    # The user's file is saved as written, comments included.
    assert (agent_config.parent / "policy.toml").read_text() == VALID_FILE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[rules]]\nname = "near"\nselect = "nearest"\n',
            "rules[0] \"near\": select: invalid value 'nearest'; use most-active, closest",
        ),
        (
            '[[rules]]\nname = "a"\nselect = "all"\n[[rules]]\nname = "b"\nselect = "all"\n'
            'require = ["smell"]\n',
            "rules[1] \"b\": require: invalid value 'smell'; use a list of images",
        ),
        ('fallback = "some"\n', "fallback: invalid value 'some'; use all or none"),
        (
            '[[rules]]\nname = "x"\nselect = "all"\nmatch = { subject = "[urgent" }\n',
            "rules[0] \"x\": match.subject: invalid glob '[urgent'",
        ),
        ('[[rules]]\nname = "x"\nselct = "all"\n', 'rules[0] "x": selct: unknown key'),
        ("[[rules]\n", "invalid TOML"),
    ],
)
def test_set_invalid_file_exits_2(tmp_path, agent_config, mosquitto, text, expected):
    policy_file = tmp_path / "bad.toml"
    policy_file.write_text(text)

    result = policy_command(tmp_path, agent_config, "set", str(policy_file))

    assert result.returncode == 2, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert str(policy_file) in lines[0]
    assert "Traceback" not in result.stderr
    assert retained_policy(mosquitto.port, timeout=1.0) is None
    assert not (agent_config.parent / "policy.toml").exists()


def test_set_unreachable_broker_exits_1(tmp_path, agent_config):
    port = free_port()

    result = policy_command(
        tmp_path, agent_config, "set", "--most-active", "--broker", f"mqtt://127.0.0.1:{port}"
    )

    assert result.returncode == 1, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert f"broker mqtt://127.0.0.1:{port}: cannot connect" in lines[0]
    assert not (agent_config.parent / "policy.toml").exists()


@pytest.mark.parametrize(
    "arguments",
    [["set"], ["set", "--all", "--closest"], ["set", "x.toml", "--all"]],
)
def test_set_needs_one_source(tmp_path, agent_config, arguments):
    result = policy_command(tmp_path, agent_config, *arguments)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr


def test_show_invalid_retained_policy(tmp_path, agent_config, mosquitto):
    third_party = Subscriber(mosquitto.port, "mailpush/v1/alice/#")
    bad = {"v": 1, "updated": time.time(), "set_by": "x", "rules": [{"name": "r", "select": "?"}]}
    third_party.publish(POLICY_TOPIC, json.dumps(bad).encode(), retain=True)
    third_party.close()

    result = policy_command(tmp_path, agent_config, "show")

    assert result.returncode == 1, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert "the retained policy is invalid" in lines[0]
    assert "keeps its last good policy" in lines[0]


def test_policy_command_leaves_agent_session_alone(tmp_path, agent_config, mosquitto):
    """The command's client id differs from the agent's, so the broker does not kick the agent."""
    disconnected = []
    agent = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="mailpush-alice-desk")
    agent.on_disconnect = lambda *args: disconnected.append(args)
    agent.connect("127.0.0.1", mosquitto.port)
    agent.loop_start()
    try:
        result = policy_command(tmp_path, agent_config, "set", "--most-active")
        shown = policy_command(tmp_path, agent_config, "show")
        agent.publish("mailpush/v1/alice/probe-check", b"x", qos=1).wait_for_publish(5)
    finally:
        agent.disconnect()
        agent.loop_stop()

    assert result.returncode == 0, result.stderr
    assert shown.returncode == 0, shown.stderr
    assert disconnected[:-1] == [], mosquitto.log()[-2000:]
    assert "mailpush-policy.alice.desk." in mosquitto.log()


# ---------------------------------------------------------------- edit


def test_edit_publishes_edited_file(tmp_path, agent_config, mosquitto):
    editor, calls = write_editor(tmp_path, VALID_FILE)

    result = policy_command(tmp_path, agent_config, "edit", env_extra={"EDITOR": editor})
    published = retained_policy(mosquitto.port)

    assert result.returncode == 0, result.stderr
    assert calls.read_text() == "1"
    assert [rule["name"] for rule in published["rules"]] == ["photos", "rest"]
    assert published["fallback"] == "none"
    assert (agent_config.parent / "policy.toml").read_text() == VALID_FILE


def test_edit_starts_from_policy_in_force(tmp_path, agent_config):
    seen = tmp_path / "seen.toml"
    script = tmp_path / "show-draft.py"
    script.write_text(
        f"import shutil, sys\nshutil.copyfile(sys.argv[1], {str(seen)!r})\n"
        f"shutil.copyfile({str(tmp_path / 'new.toml')!r}, sys.argv[1])\n"
    )
    (tmp_path / "new.toml").write_text('[[rules]]\nname = "all"\nselect = "all"\n')
    policy_command(tmp_path, agent_config, "set", "--closest")
    # Another terminal's policy replaces the local file's, so the draft must show it.
    (agent_config.parent / "policy.toml").write_text('[[rules]]\nname = "old"\nselect = "all"\n')

    result = policy_command(
        tmp_path, agent_config, "edit", env_extra={"EDITOR": f"{sys.executable} {script}"}
    )

    assert result.returncode == 0, result.stderr
    draft = tomllib.loads(seen.read_text())
    assert [rule["select"] for rule in draft["rules"]] == ["closest", "most-active"]


def test_edit_invalid_then_decline_keeps_old(tmp_path, agent_config, mosquitto):
    policy_command(tmp_path, agent_config, "set", "--most-active")
    editor, calls = write_editor(tmp_path, '[[rules]]\nname = "x"\nselect = "closest:1"\n')

    result = policy_command(
        tmp_path, agent_config, "edit", env_extra={"EDITOR": editor}, stdin="n\n"
    )
    published = retained_policy(mosquitto.port)

    assert result.returncode == 2, result.stderr
    assert calls.read_text() == "1"
    assert "invalid policy: policy.toml: rules[0] \"x\": select: invalid value 'closest:1'" in (
        result.stderr
    )
    assert "Edit it again?" in result.stderr
    assert "error: the policy in force stays as it was; nothing was published" in result.stderr
    assert [rule["select"] for rule in published["rules"]] == ["most-active"]


def test_edit_invalid_then_fixed(tmp_path, agent_config, mosquitto):
    editor, calls = write_editor(
        tmp_path, '[[rules]]\nname = "x"\nrequire = ["smell"]\nselect = "all"\n', VALID_FILE
    )

    result = policy_command(
        tmp_path, agent_config, "edit", env_extra={"EDITOR": editor}, stdin="y\n"
    )
    published = retained_policy(mosquitto.port)

    assert result.returncode == 0, result.stderr
    assert calls.read_text() == "2"
    assert "require: invalid value 'smell'" in result.stderr
    assert [rule["name"] for rule in published["rules"]] == ["photos", "rest"]


# ---------------------------------------------------------------- explain


def publish_terminal(client, terminal, state, kind, capabilities=(), age_s=0.0, **extra):
    now = time.time()
    payload = {
        "v": 1,
        "user": "alice",
        "terminal": terminal,
        "state": state,
        "since": now - age_s - 60,
        "ts": now - age_s,
        "seq": 1,
        "confidence": 0.9,
        **extra,
    }
    attributes = {"v": 1, "kind": kind, "capabilities": list(capabilities)}
    base = f"mailpush/v1/alice/terminals/{terminal}"
    client.publish(f"{base}/attributes", json.dumps(attributes).encode(), retain=True)
    client.publish(f"{base}/state", json.dumps(payload).encode(), retain=True)


def test_explain_lists_terminals_and_rules(tmp_path, agent_config, mosquitto):
    policy_file = tmp_path / "mine.toml"
    policy_file.write_text(VALID_FILE)
    policy_command(tmp_path, agent_config, "set", str(policy_file))
    client = Subscriber(mosquitto.port, "mailpush/v1/none")
    publish_terminal(
        client, "nb", "active", "laptop", evidence={"input_idle_s": 2.0},
        position={"zone": "study", "proximity": 0.9},
    )  # fmt: skip
    publish_terminal(
        client, "tab", "idle", "tablet", ["images", "color"], position={"proximity": 0.4}
    )
    publish_terminal(client, "pc", "active", "desktop", ["images"], age_s=400)
    client.close()

    text = policy_command(tmp_path, agent_config, "explain", "--images", "--subject", "Holiday")
    as_json = policy_command(tmp_path, agent_config, "explain", "--no-images", "--json")

    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "Policy: set by desk on " in out
    assert "images yes" in out
    assert "nb: active, kind laptop, capabilities none, input" in out
    assert "proximity 0.90, zone study" in out
    assert re.search(r"pc: unknown \(state 4\d\d s old\), kind desktop", out), out
    assert "Mail goes to: tab" in out
    assert "Prompt goes to: nb" in out
    assert 'rules[0] "photos": matched; candidates: pc, tab;' in out
    assert 'rules[1] "rest": not checked: rule "photos" decided first' in out

    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["decision"]["deliver"] == ["nb"]
    assert data["decision"]["rule"] == "rest"
    assert data["decision"]["trace"][0]["matched"] is False
    assert [view["terminal"] for view in data["terminals"]] == ["nb", "pc", "tab"]
    assert data["terminals"][1]["state"] is None
    assert data["terminals"][2]["capabilities"] == ["color", "images"]


def photo_mail() -> bytes:
    message = EmailMessage()
    message["From"] = "Dana <dana@example.org>"
    message["Subject"] = "Holiday photos"
    message.set_content("Two pictures attached.")
    message.add_attachment(b"\x89PNG\r\n", maintype="image", subtype="png", filename="a.png")
    return bytes(message)


def test_explain_eml_reads_traits(tmp_path, agent_config):
    eml = tmp_path / "photo.eml"
    eml.write_bytes(photo_mail())

    result = policy_command(tmp_path, agent_config, "explain", "--eml", str(eml), "--json")

    assert result.returncode == 0, result.stderr
    mail = json.loads(result.stdout)["mail"]
    assert mail["has_images"] is True
    assert mail["subject"] == "Holiday photos"
    assert mail["from"] == "Dana <dana@example.org>"
    assert [item["name"] for item in mail["attachments"]] == ["a.png"]
    assert mail["size"] == len(eml.read_bytes())


def sample_mails() -> dict[str, bytes]:
    plain = EmailMessage()
    plain["From"] = "a@example.org"
    plain["Subject"] = "plain"
    plain.set_content("text only")

    inline = EmailMessage()
    inline["From"] = "b@example.org"
    inline["Subject"] = "inline image"
    inline.set_content("see below")
    inline.add_alternative("<p>hi <img src='cid:logo'></p>", subtype="html")
    inline.get_payload()[1].add_related(b"GIF89a", "image", "gif", cid="<logo>")

    pdf = EmailMessage()
    pdf["From"] = "c@example.org"
    pdf["Subject"] = "=?utf-8?q?R=C3=A9sum=C3=A9?="
    pdf.set_content("cv attached")
    pdf.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf", filename="cv.pdf")

    forwarded = EmailMessage()
    forwarded["From"] = "d@example.org"
    forwarded["Subject"] = "fwd"
    forwarded.set_content("forwarding")
    forwarded.add_attachment(photo_mail_message())

    return {
        "plain": bytes(plain),
        "inline": bytes(inline),
        "pdf": bytes(pdf),
        "forwarded": bytes(forwarded),
        "photo": photo_mail(),
        "broken": b"From: x\nContent-Type: multipart/mixed; boundary=zz\n\n--zz\nContent-Type: image/\n\n",
    }


def photo_mail_message() -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = "inner"
    message.set_content("inner")
    message.add_attachment(b"\xff\xd8", maintype="image", subtype="jpeg", filename="in.jpg")
    return message


@pytest.mark.parametrize("name", sorted(sample_mails()))
def test_eml_traits_match_service_summary(tmp_path, name):
    raw = sample_mails()[name]
    path = tmp_path / f"{name}.eml"
    path.write_bytes(raw)

    mine = mail_traits_from_eml(path)
    service = summarize(raw, "1", seen=False)

    assert mine.has_images == service.has_images
    assert [item.name for item in mine.attachments] == [item.name for item in service.attachments]
    assert [item.type for item in mine.attachments] == [item.type for item in service.attachments]
    assert mine.sender == service.sender
    assert mine.subject == service.subject
    assert mine.size == service.size


def test_eml_traits_cases(tmp_path):
    traits = {}
    for name, raw in sample_mails().items():
        path = tmp_path / f"{name}.eml"
        path.write_bytes(raw)
        traits[name] = mail_traits_from_eml(path)

    assert traits["photo"].has_images is True
    assert traits["inline"].has_images is True
    assert traits["inline"].attachments == []
    assert traits["pdf"].has_images is False
    assert traits["pdf"].subject == "Résumé"
    # An attached message is one part; the image inside it is not opened.
    assert traits["forwarded"].has_images is False
    assert traits["plain"].attachments == []


def docs_examples() -> list[tuple[str, str, list[str]]]:
    """Return (heading, policy.toml, `policy set` arguments) for each worked example."""
    text = (Path(__file__).parent.parent / "docs" / "policies.md").read_text()
    section = text.split("## Worked examples", 1)[1].split("\n## ", 1)[0]
    examples = []
    for chunk in section.split("\n### ")[1:]:
        heading = chunk.splitlines()[0]
        toml_block = chunk.split("```toml\n", 1)[1].split("```", 1)[0]
        command = chunk.split("```sh\n", 1)[1].split("```", 1)[0].strip()
        assert command.startswith("mailpush-agent policy set "), heading
        examples.append((heading, toml_block, command.split()[3:]))
    return examples


def test_docs_examples_match_their_commands(tmp_path, agent_config, mosquitto):
    examples = docs_examples()
    assert [heading[:3] for heading, _, _ in examples] == [
        "(a)", "(b)", "(c)", "(d)", "(e)", "(f)",
    ]  # fmt: skip

    for heading, toml_text, arguments in examples:
        written = tmp_path / "example.toml"
        written.write_text(toml_text)
        if arguments[0].endswith(".toml"):
            arguments = [str(written)]
        by_command = policy_command(tmp_path, agent_config, "set", *arguments)
        from_command = retained_policy(mosquitto.port)
        by_file = policy_command(tmp_path, agent_config, "set", str(written))
        from_file = retained_policy(mosquitto.port)

        assert by_command.returncode == 0, (heading, by_command.stderr)
        assert by_file.returncode == 0, (heading, by_file.stderr)
        assert from_command["rules"] == from_file["rules"], heading
        assert from_command.get("fallback", "all") == from_file.get("fallback", "all"), heading
