"""Turn a raw mail into the summary that a push carries.

Parsing uses the standard library's ``email`` package with
``email.policy.default``. Malformed MIME never raises: each field is read on
its own, a field that cannot be read is left empty, and one line is logged per
mail naming the fields, never their content or the body.
"""

import email
import email.policy
import functools
import logging
import re
from collections.abc import Callable, Iterator
from datetime import UTC
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from html.parser import HTMLParser
from typing import TypeVar

from mailpush.protocol.messages import Attachment, MailSummary

log = logging.getLogger(__name__)

SNIPPET_MAX_CHARS = 280

# RFC 5322 section 2.1.1 limits a header line to 998 characters. A longer
# From or Subject is cut, so that one mail cannot inflate every push.
HEADER_MAX_CHARS = 998

# NOTE: a mail with more attachments lists only the first 100, and each name and
# type is cut, to keep the push far below the protocol's 256 KiB payload limit.
MAX_ATTACHMENTS = 100
# Most file systems allow 255 characters in a name; RFC 6838 section 4.2 allows
# 127 characters for each of a media type's two names.
ATTACHMENT_NAME_MAX_CHARS = 255
ATTACHMENT_TYPE_MAX_CHARS = 255

# Guards against a crafted mail whose MIME parts nest deeply enough to exhaust the stack.
MAX_DEPTH = 30

# How many parsed header values (up to HEADER_MAX_CHARS characters each) are kept for reuse.
PARSED_HEADERS_KEPT = 128

# Tags whose text is not shown to a reader.
HIDDEN_HTML_TAGS = frozenset({"head", "script", "style", "template", "title"})

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

T = TypeVar("T")


def summarize(raw: bytes, mail_id: str, seen: bool) -> MailSummary:
    r"""Summarize a raw RFC 5322 mail for a push.

    Args:
        raw: The whole message as it came from the mailbox.
        mail_id: The mail's id in its mailbox (``NewMail.mail_id``).
        seen: Whether the mail is flagged ``\Seen``.

    Returns:
        The summary; fields that could not be read are empty.
    """
    problems: list[str] = []
    message = _read(problems, "MIME structure", None, _parse, raw)
    if message is None:
        # The body could not be parsed (nesting deep enough to exhaust the
        # stack, say); the headers alone still tell who wrote and about what.
        headers = _read(problems, "headers", None, _parse_headers, raw)
        _log_problems(mail_id, problems)
        if headers is None:
            return MailSummary(id=mail_id, size=len(raw), seen=seen)
        return MailSummary(
            id=mail_id,
            message_id=_read(problems, "Message-ID", "", _header, headers, "message-id"),
            sender=_read(problems, "From", "", _header, headers, "from"),
            subject=_read(problems, "Subject", "", _header, headers, "subject"),
            date=_read(problems, "Date", "", _date, headers),
            size=len(raw),
            seen=seen,
        )

    parts = _read(problems, "MIME parts", [], lambda: list(_leaf_parts(message, 0)))
    summary = MailSummary(
        id=mail_id,
        message_id=_read(problems, "Message-ID", "", _header, message, "message-id"),
        sender=_read(problems, "From", "", _header, message, "from"),
        subject=_read(problems, "Subject", "", _header, message, "subject"),
        date=_read(problems, "Date", "", _date, message),
        snippet=_read(problems, "text", "", _snippet, parts),
        size=len(raw),
        has_images=any(_safe_type(part).startswith("image/") for part in parts),
        attachments=_read(problems, "attachments", [], _attachments, parts),
        seen=seen,
    )
    _log_problems(mail_id, problems)
    return summary


def _read(
    problems: list[str], field_name: str, default: T, read: Callable[..., T], *args: object
) -> T:
    """Call ``read``; on any exception note ``field_name`` and return ``default``."""
    try:
        return read(*args)
    except Exception as exc:  # the email package raises many types on malformed input
        problems.append(f"{field_name} ({type(exc).__name__})")
        return default


def _log_problems(mail_id: str, problems: list[str]) -> None:
    if problems:
        log.info("summary: mail %s is malformed; left out: %s", mail_id, ", ".join(problems))


class _ReusingPolicy(email.policy.EmailPolicy):
    """``email.policy.default`` that reuses the header objects it parsed before.

    The default policy parses a header again on every access. Parsing and
    summarizing one plain mail reads its Content-Type several times, and
    most senders and content types recur from mail to mail. The email package
    does not change a header object after creating it, so sharing one changes
    no summary.
    """

    def header_fetch_parse(self, name: str, value: str) -> str:
        """Return the header object for ``value``, parsed once per distinct value."""
        if hasattr(value, "name") or len(value) > HEADER_MAX_CHARS:
            return super().header_fetch_parse(name, value)
        return _header_object(name, value)


@functools.lru_cache(maxsize=PARSED_HEADERS_KEPT)
def _header_object(name: str, value: str) -> str:
    return email.policy.default.header_fetch_parse(name, value)


_POLICY = _ReusingPolicy()


def _parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=_POLICY)
    assert isinstance(message, EmailMessage)  # guaranteed by any EmailPolicy
    return message


def _parse_headers(raw: bytes) -> Message:
    return BytesHeaderParser(policy=_POLICY).parsebytes(raw)


def _header(message: Message, name: str) -> str:
    # policy.default decodes RFC 2047 encoded words when the header is read.
    value = message.get(name)
    return clean_text(str(value), HEADER_MAX_CHARS) if value is not None else ""


def _date(message: Message) -> str:
    header = message.get("date")
    moment = getattr(header, "datetime", None) if header is not None else None
    if moment is None:
        return ""
    if moment.tzinfo is None:
        # RFC 5322 section 3.3: "-0000" means the zone is unknown; the time is in UTC.
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat()


def _leaf_parts(part: Message, depth: int) -> Iterator[Message]:
    """Yield every non-multipart part; an attached message is one part, not opened."""
    if depth > MAX_DEPTH:
        return
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        for child in part.get_payload():
            if isinstance(child, Message):
                yield from _leaf_parts(child, depth + 1)
    else:
        yield part


def _safe_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        return "application/octet-stream"


def _is_attachment(part: Message) -> bool:
    disposition = part.get_content_disposition()
    if disposition == "attachment":
        return True
    # A named part without a disposition is an attachment too, unless it is
    # body text; a named inline part (an image in HTML) is not.
    return disposition is None and part.get_filename() is not None and not part.is_multipart()


def _attachments(parts: list[Message]) -> list[Attachment]:
    found = []
    for part in parts:
        if not _is_attachment(part):
            continue
        if len(found) == MAX_ATTACHMENTS:
            break
        name = clean_text(part.get_filename() or "", ATTACHMENT_NAME_MAX_CHARS)
        content_type = _safe_type(part)[:ATTACHMENT_TYPE_MAX_CHARS]
        found.append(Attachment(name=name, type=content_type, size=_payload_size(part)))
    return found


def _payload_size(part: Message) -> int:
    """Return the decoded size of a part; an attached message counts as its raw size."""
    try:
        if part.is_multipart():
            return sum(len(child.as_bytes()) for child in part.get_payload())
        payload = part.get_payload(decode=True)
    except Exception:  # a part that cannot be decoded is listed with size 0
        return 0
    return len(payload) if isinstance(payload, bytes) else 0


def _snippet(parts: list[Message]) -> str:
    """Return the start of the first text/plain body part, else of the first text/html one."""
    body_parts = [part for part in parts if not _is_attachment(part)]
    for content_type in ("text/plain", "text/html"):
        for part in body_parts:
            if _safe_type(part) != content_type:
                continue
            text = _text_of(part)
            if content_type == "text/html":
                text = html_to_text(text)
            snippet = clean_text(text, SNIPPET_MAX_CHARS)
            if snippet:
                return snippet
    return ""


def _text_of(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # a charset Python does not know
        return payload.decode("utf-8", errors="replace")


class _TextExtractor(HTMLParser):
    """Collects the visible text of an HTML document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self.hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in HIDDEN_HTML_TAGS:
            self.hidden_depth += 1
        # Block elements and line breaks separate words.
        self.chunks.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in HIDDEN_HTML_TAGS and self.hidden_depth:
            self.hidden_depth -= 1
        self.chunks.append(" ")

    def handle_data(self, data: str) -> None:
        if not self.hidden_depth:
            self.chunks.append(data)


def html_to_text(html: str) -> str:
    """Return the visible text of an HTML document, without markup."""
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    return "".join(extractor.chunks)


def clean_text(text: str, max_chars: int) -> str:
    """Return ``text`` on one line, whitespace collapsed, at most ``max_chars`` characters.

    Control characters become spaces, and lone surrogates (left by undecodable
    header bytes) become U+FFFD, so the result always encodes as UTF-8 JSON.
    """
    text = text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")
    text = " ".join(_CONTROL_CHARS.sub(" ", text).split())
    if len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    return text
