"""Fuzz the mail summary with broken MIME: bad headers and encodings, deep nesting, huge parts.

``summarize`` must never raise, and the Push that carries its result must be a
valid payload within the 256 KiB limit, or the terminal would drop the mail.
tests/test_summary.py fuzzes flat messages and random bytes. These strategies
build whole MIME trees and serialize them by hand, so that they can be wrong.
Then they damage the bytes. ``bench/fuzz.py`` runs the same target for a million inputs.
"""

import re
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailpush.protocol.messages import MAX_PAYLOAD_BYTES, Push, decode, encode
from mailpush.server.summary import (
    HEADER_MAX_CHARS,
    MAX_ATTACHMENTS,
    SNIPPET_MAX_CHARS,
    summarize,
)
from tests.test_fuzz_payloads import CI_SETTINGS, Target

CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

CONTENT_TYPES = [
    "text/plain", "text/html", "image/png", "image/", "application/pdf", "message/rfc822",
    "text/rfc822-headers", "multipart/mixed", "bogus", "", "text/plain/extra", "x" * 3000,
]  # fmt: skip
CHARSETS = ["utf-8", "iso-8859-1", "utf-7", "utf-16", "x-no-such", "", '"', "utf-8\x00"]
ENCODINGS = ["base64", "quoted-printable", "8bit", "7bit", "x-uuencode", "bogus", ""]
FILENAMES = [
    None, "report.pdf", "=?utf-8?b?!!!?=", "a\r\nb", "x" * 2000, "../../etc/passwd",
    "utf-8''%ff%fe", "\x00.png",
]  # fmt: skip
HEADER_TEXT = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        ["=?utf-8?q?J=C3=BCrgen?= <j@example.org>", "=?bogus?q?x?=", "=?utf-8?b?!!!?=",
         "<<@@>>", "a\r\n\tfolded", "Thu, 31 Feb 2023 25:61:61 +9999", "\x00\x01\x7f",
         "Tue, 01 Aug 2023 10:15:30 -0000", "x" * 5000]
    ),
)  # fmt: skip
# About one part in 40 is huge (300 KB or 1.1 MB), so that most mails stay quick to draw.
BODY_SIZES = st.sampled_from([0] * 39 + [1]).flatmap(
    lambda huge: st.sampled_from([300_000, 1_100_000]) if huge else st.just(0)
)
BODIES = st.tuples(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")),
        st.sampled_from([b"=C3=", b"iVBORw0KGgo=", b"====", b"<p>hi</p><script>x</script>"]),
    ),
    BODY_SIZES,
).map(lambda pair: pair[0] + b"A" * pair[1])


@st.composite
def leaf(draw: st.DrawFn) -> list[bytes]:
    """Draw the header lines and body of one non-multipart part."""
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    lines = [f"Content-Type: {content_type}; charset={draw(st.sampled_from(CHARSETS))}"]
    encoding = draw(st.sampled_from(ENCODINGS))
    if encoding:
        lines.append(f"Content-Transfer-Encoding: {encoding}")
    filename = draw(st.sampled_from(FILENAMES))
    disposition = draw(st.sampled_from(["attachment", "inline", "", "bogus"]))
    if filename is not None or disposition:
        lines.append(f'Content-Disposition: {disposition}; filename="{filename or ""}"')
    encoded = [line.encode("utf-8", "surrogatepass") for line in lines]
    return [*encoded, b"", draw(BODIES)]


def multipart(children: list[list[bytes]], boundary: str, subtype: str) -> list[bytes]:
    """Return the lines of a multipart part around already serialized children."""
    lines = [f'Content-Type: multipart/{subtype}; boundary="{boundary}"'.encode(), b""]
    for child in children:
        lines.append(f"--{boundary}".encode())
        lines.extend(child)
    lines.append(f"--{boundary}--".encode())
    return lines


def trees(max_leaves: int = 8) -> st.SearchStrategy[list[bytes]]:
    """Return MIME trees of leaves and multiparts, a few levels deep."""
    return st.recursive(
        leaf(),
        lambda children: st.builds(
            multipart,
            st.lists(children, min_size=0, max_size=4),
            st.sampled_from(["b1", "b2", "", "b1", " ", "=_x"]),
            st.sampled_from(["mixed", "alternative", "related", "digest", "bogus"]),
        ),
        max_leaves=max_leaves,
    )


@st.composite
def deep_nesting(draw: st.DrawFn) -> list[bytes]:
    """Draw a chain of multiparts nested far deeper than any real mail."""
    depth = draw(st.integers(min_value=1, max_value=120))
    lines = [b"Content-Type: text/plain", b"", b"innermost"]
    for level in range(depth):
        lines = multipart([lines], f"d{level}", "mixed")
    return lines


@st.composite
def mails(draw: st.DrawFn) -> bytes:
    """Draw a whole mail: top-level headers, a MIME tree, then damage to its bytes."""
    headers = [
        f"{name}: {draw(HEADER_TEXT)}".encode("utf-8", "surrogatepass")
        for name in draw(
            st.lists(st.sampled_from(["From", "Subject", "Date", "Message-ID", "To"]), max_size=6)
        )
    ]
    deep = draw(st.integers(min_value=0, max_value=9)) == 0
    body = draw(deep_nesting() if deep else trees())
    newline = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    raw = bytearray(newline.join([*headers, b"MIME-Version: 1.0", *body]))

    damage = draw(st.sampled_from(["none", "none", "cut", "insert", "overwrite", "nul-line"]))
    position = draw(st.integers(min_value=0, max_value=len(raw)))
    if damage == "cut":
        del raw[position:]
    elif damage == "insert":
        raw[position:position] = draw(
            st.sampled_from([b"\xff\xfe", b"\r\n\r\n", b"--b1\r\n", b"\x00"])
        )
    elif damage == "overwrite" and position < len(raw):
        raw[position] = draw(st.integers(min_value=0, max_value=255))
    elif damage == "nul-line":
        raw[position:position] = b"\x00" * 100 + b"\n"
    return bytes(raw)


def check_summary(raw: bytes) -> None:
    """Assert that a mail of any shape gives a summary whose Push is valid and within 256 KiB."""
    summary = summarize(raw, "fuzz-1", seen=False)

    assert summary.id == "fuzz-1"
    assert summary.size == len(raw)
    assert len(summary.snippet) <= SNIPPET_MAX_CHARS
    for field in (summary.sender, summary.subject, summary.message_id, summary.snippet):
        assert len(field) <= HEADER_MAX_CHARS
        assert not CONTROL_CHARS.search(field), f"control character in {field!r}"
    assert len(summary.attachments) <= MAX_ATTACHMENTS

    payload = encode(Push(id="p", kind="mail", mail=summary, ts=1.0))
    assert len(payload) <= MAX_PAYLOAD_BYTES, f"a push of {len(payload)} bytes would be dropped"
    assert decode(payload, Push).mail == summary


TARGETS = [Target("summarize", mails(), check_summary)]


# ---------------------------------------------------------------- the CI run


@pytest.mark.parametrize("target", TARGETS, ids=[target.name for target in TARGETS])
def test_mime_target_holds(target: Target) -> None:
    @CI_SETTINGS
    @given(target.strategy)
    def run(raw: Any) -> None:
        target.check(raw)

    run()


def test_huge_part_summarized_quickly() -> None:
    # 20 MiB of base64 in one attachment, beside a short text part.
    lines = multipart(
        [
            [b"Content-Type: text/plain", b"", b"see attached"],
            [b"Content-Type: application/pdf", b"Content-Transfer-Encoding: base64",
             b'Content-Disposition: attachment; filename="big.pdf"', b"", b"QUFB" * 5_242_880],
        ],
        "big",
        "mixed",
    )  # fmt: skip
    raw = b"\r\n".join([b"Subject: big", b"MIME-Version: 1.0", *lines])

    started = time.monotonic()
    summary = summarize(raw, "big-1", seen=False)
    elapsed = time.monotonic() - started

    assert summary.snippet == "see attached"
    assert [a.name for a in summary.attachments] == ["big.pdf"]
    assert summary.attachments[0].size == 3 * 5_242_880
    assert elapsed < 30, f"summarizing 20 MiB took {elapsed:.1f} s"


def test_deep_nesting_never_raises() -> None:
    # 2,000 levels exhaust the email package's recursion, so the summary is left
    # empty without an error. tests/test_found_bugs.py expects the headers kept.
    lines = [b"Content-Type: text/plain", b"", b"innermost"]
    for level in range(2_000):
        lines = multipart([lines], f"d{level}", "mixed")
    raw = b"\r\n".join([b"Subject: deep", b"MIME-Version: 1.0", *lines])

    check_summary(raw)
