"""Tests of the mail summary: fields, MIME shapes and malformed input."""

import logging

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailpush.protocol.messages import MailSummary
from mailpush.server.summary import SNIPPET_MAX_CHARS, html_to_text, summarize


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


PLAIN = crlf(
    """From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <juergen@example.org>
To: you@example.org
Subject: =?utf-8?b?R3LDvMOfZSBhdXMgQmVybGlu?=
Date: Tue, 01 Aug 2023 10:15:30 +0200
Message-ID: <plain-1@example.org>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Hallo,
   das ist   ein Test mit =C3=BCmlauten.
"""
)

RICH = crlf(
    """From: Ann <ann@example.org>
Subject: Report
Date: Wed, 2 Aug 2023 08:00:00 -0000
Message-ID: <rich-1@example.org>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: multipart/related; boundary="inner"

--inner
Content-Type: text/html; charset=utf-8

<html><head><title>Hidden title</title><style>p {color: red}</style></head>
<body><p>Dear&nbsp;team,</p><script>alert(1)</script><div>see <b>the</b> report</div></body></html>
--inner
Content-Type: image/png
Content-Disposition: inline; filename="logo.png"
Content-ID: <logo@example.org>
Content-Transfer-Encoding: base64

iVBORw0KGgoAAAANSUhEUg==
--inner--
--outer
Content-Type: application/pdf; name="report.pdf"
Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf
Content-Transfer-Encoding: base64

JVBERi0xLjQKJcfs
--outer
Content-Type: message/rfc822
Content-Disposition: attachment; filename="forwarded.eml"

Subject: inner mail

The inner body is not the snippet.
--outer--
"""
)


def test_plain_fields_decoded():
    summary = summarize(PLAIN, "1-7", seen=True)

    assert summary.id == "1-7"
    assert summary.sender == "Jürgen Müller <juergen@example.org>"
    assert summary.subject == "Grüße aus Berlin"
    assert summary.date == "2023-08-01T10:15:30+02:00"
    assert summary.message_id == "<plain-1@example.org>"
    assert summary.snippet == "Hallo, das ist ein Test mit ümlauten."
    assert summary.size == len(PLAIN)
    assert summary.has_images is False
    assert summary.attachments == []
    assert summary.seen is True


def test_html_snippet_without_markup():
    summary = summarize(RICH, "1-8", seen=False)

    assert summary.snippet == "Dear team, see the report"
    assert "<" not in summary.snippet


def test_rich_images_and_attachments():
    summary = summarize(RICH, "1-8", seen=False)

    assert summary.has_images is True
    names = [attachment.name for attachment in summary.attachments]
    assert names == ["résumé.pdf", "forwarded.eml"]
    pdf = summary.attachments[0]
    assert pdf.type == "application/pdf"
    assert pdf.size == len(b"%PDF-1.4\n%\xc7\xec")
    assert summary.attachments[1].type == "message/rfc822"


def test_unknown_zone_date_is_utc():
    summary = summarize(RICH, "1-8", seen=False)

    assert summary.date == "2023-08-02T08:00:00+00:00"


def test_plain_preferred_over_html():
    raw = crlf(
        """Subject: both
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain

plain words
--alt
Content-Type: text/html

<p>html words</p>
--alt--
"""
    )

    assert summarize(raw, "x", seen=False).snippet == "plain words"


def test_text_attachment_not_snippet():
    raw = crlf(
        """Subject: only an attachment
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="b"

--b
Content-Type: text/plain; name="notes.txt"
Content-Disposition: attachment; filename="notes.txt"

attachment text
--b--
"""
    )
    summary = summarize(raw, "x", seen=False)

    assert summary.snippet == ""
    assert [a.name for a in summary.attachments] == ["notes.txt"]
    # RFC 2046 section 5.1.1: the CRLF before a boundary belongs to the boundary.
    assert summary.attachments[0].size == len(b"attachment text")


def test_long_body_cut_to_limit():
    raw = b"Subject: long\r\n\r\n" + b"word " * 1000

    snippet = summarize(raw, "x", seen=False).snippet

    assert len(snippet) == SNIPPET_MAX_CHARS
    assert snippet.endswith("…")


def test_unknown_charset_falls_back():
    raw = b"Subject: x\r\nContent-Type: text/plain; charset=x-no-such\r\n\r\nhello \xff world\r\n"

    assert summarize(raw, "x", seen=False).snippet == "hello \ufffd world"


def test_undecodable_header_encodes_as_json():
    raw = b"From: \xff\xfe <a@b.c>\r\nSubject: caf\xe9\r\n\r\nbody\r\n"

    summary = summarize(raw, "x", seen=False)
    decoded = msgspec.json.decode(msgspec.json.encode(summary), type=MailSummary)

    assert decoded.snippet == "body"
    assert "caf" in decoded.subject


def test_malformed_logged_without_body(caplog):
    secret_body = b"the-secret-body-text"
    raw = b"Date: not a date at all\r\nFrom: x\r\n\r\n" + secret_body

    with caplog.at_level(logging.DEBUG, logger="mailpush.server.summary"):
        summary = summarize(raw, "9-9", seen=False)

    assert summary.date == ""
    assert summary.snippet == secret_body.decode()
    assert all(secret_body.decode() not in record.getMessage() for record in caplog.records)


def test_html_to_text_collapses_markup():
    assert " ".join(html_to_text("<p>a<br>b</p><style>x</style>c &amp; d").split()) == "a b c & d"


def assert_valid_summary(summary: MailSummary, raw: bytes) -> None:
    assert len(summary.snippet) <= SNIPPET_MAX_CHARS
    assert summary.size == len(raw)
    # Decoding validates every constraint of the message type, the 280 limit included.
    encoded = msgspec.json.encode(summary)
    assert msgspec.json.decode(encoded, type=MailSummary).snippet == summary.snippet


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4000))
def test_random_bytes_never_raise(raw):
    assert_valid_summary(summarize(raw, "r", seen=False), raw)


HEADER_NAMES = st.sampled_from(
    ["From", "Subject", "Date", "Message-ID", "Content-Type", "Content-Transfer-Encoding",
     "Content-Disposition", "MIME-Version", "To"]
)  # fmt: skip
HEADER_VALUES = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "multipart/mixed; boundary=b",
            'multipart/alternative; boundary=""',
            "multipart/mixed",
            "text/plain; charset=utf-7",
            "text/html; charset=no-such-charset",
            "image/png",
            "message/rfc822",
            "base64",
            "quoted-printable",
            "attachment; filename*=utf-8''%ff%fe",
            "inline; filename=",
            "=?utf-8?b?!!!?=",
            "=?bogus?q?x?=",
            "Thu, 31 Feb 2023 25:61:61 +9999",
            "<<@@>>",
        ]
    ),
)
BODY_LINES = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["--b", "--b--", "", "<p>", "</html>", "=C3=", "iVBORw0KGgo=", "====="]),
)


@st.composite
def broken_mime(draw):
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=12))
    lines = [f"{name}: {value}" for name, value in headers]
    lines.append("")
    lines.extend(draw(st.lists(BODY_LINES, max_size=40)))
    text = "\r\n".join(lines)
    return text.encode("utf-8", errors="surrogatepass")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(broken_mime())
def test_broken_mime_never_raises(raw):
    assert_valid_summary(summarize(raw, "r", seen=True), raw)
