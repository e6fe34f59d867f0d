"""The commented ``agent.toml`` that ``mailpush-agent config init`` writes."""

from mailpush.agent.config import DEFAULT_BROKER_URL

TEMPLATE = """\
# mailpush agent config. Every key below is optional except user and terminal.
# Command-line flags (--user, --terminal, --broker) override this file.

# Ids: 1 to 64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit.
user = "{user}"
terminal = "{terminal}"

[broker]
url = "{broker}"              # mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS
{protocol_line}
# username = "{user}.{terminal}"   # as `mailpush-server accounts add {user} {terminal}` creates it
# password_file = "~/.config/mailpush/broker-password"   # chmod 600; or:
# password_env = "MAILPUSH_BROKER_PASSWORD"
# ca_file = "/etc/ssl/certs/my-ca.pem"                 # for mqtts:// with a private CA
# keepalive_s = 60

[fusion]
# active_window_s = 120      # input within this many seconds: active
# away_after_s = 600         # no input or presence for longer: away
# heartbeat_s = 60           # republish the state this often even when unchanged

# skin_min_c = 30.0         # a surface this warm or warmer (up to skin_max_c) may be a hand
# skin_max_c = 37.0
# carry_hold_s = 30         # skin contact held this long: carried
# carry_release_s = 15      # contact lost this long: no longer carried
# skin_release_margin_c = 0.5   # hysteresis at the band's edges, in degrees Celsius
# presence_window_s = 300   # a presence sensor saw someone this recently: present

[position]
# zone = "study"            # where this terminal is; policies and explain show it

[receiver]
# notify = true              # show pushes as desktop notifications
# on_mail = ["/usr/local/bin/blink-led", "--times", "3"]   # run per mail, no shell

[sensors.input]
# enabled = true
# backend = "auto"           # "auto", "pynput" (X11, Windows, macOS) or "evdev" (Linux /dev/input)
# devices = []               # evdev device names to watch; empty: every keyboard and pointer

[sensors.power]
# enabled = true
# kind = "auto"              # laptop, desktop, phone, tablet, pi, other; auto guesses
# capabilities = ["images", "html", "color", "attachments", "sound"]   # what policies may require;
#                            # default: images, html and color when there is a display
"""


def render(user: str, terminal: str, broker: str | None = None) -> str:
    """Return the config file text for one terminal.

    Without a broker URL the file points at the service's embedded broker,
    which speaks MQTT 3.1.1 only, so it says so and the agent skips its wait
    for an MQTT 5 CONNACK.
    """
    if broker is None:
        protocol_line = 'protocol = "3.1.1"         # the embedded broker speaks MQTT 3.1.1 only'
    else:
        protocol_line = (
            '# protocol = "auto"        # "auto" tries MQTT 5, then 3.1.1; or "5", "3.1.1"'
        )
    return TEMPLATE.format(
        user=user,
        terminal=terminal,
        broker=broker or DEFAULT_BROKER_URL,
        protocol_line=protocol_line,
    )
