r"""Watch an IMAP folder for new mail, with IDLE (RFC 2177) or by polling.

The watching connection selects the folder read-only (EXAMINE) and fetches
with ``BODY.PEEK[]``, so it never sets ``\Seen`` or changes anything else. It
remembers the folder's UIDVALIDITY and the last UID handled in the state store;
after a restart or a reconnect it searches for every UID above that one, so mail
that arrived meanwhile is caught up. Only UIDs are used, never sequence numbers.

Read state: ``set_seen`` opens a short connection of its own, never the watching
one. To find ``\Seen`` changes made elsewhere, the watcher searches the most
recent handled UIDs for seen mail after each connect, every ``flags_sync_s``,
and whenever the server reports a flag change during IDLE (an untagged FETCH,
RFC 3501 section 7.4.2).
"""

import logging
import select
import ssl
import threading
import time
from dataclasses import dataclass

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from mailpush.errors import MailpushError
from mailpush.server.mailbox.base import (
    FlagCallback,
    MailCallback,
    NewMail,
    RetryLater,
    SeenTracker,
)
from mailpush.server.mailbox.imap_connection import (
    Backoff,
    ImapConfig,
    close,
    connect,
    describe_error,
)
from mailpush.server.mailbox.state import ImapPosition, StateStore

__all__ = ["ImapConfig", "ImapWatcher"]

log = logging.getLogger(__name__)

# How often a wait inside IDLE checks the stop event.
STOP_CHECK_S = 0.5

# The read-state check covers the UIDs from last_uid - 499 to last_uid, so at
# most 500 mails, which bounds the memory and the search.
# NOTE: a read-state change of a mail below that range is not reported.
FLAGS_WINDOW = 500

SEEN = b"\\Seen"


@dataclass
class _Cursor:
    uidvalidity: int
    last_uid: int


class ImapWatcher:
    """Find new mail in one IMAP folder and hand each mail to ``on_mail`` once.

    At the first start, and after a UIDVALIDITY change, the mail already in
    the folder is taken as handled and not pushed.

    Args:
        config: The server, account and timing.
        store: The state store that remembers UIDVALIDITY and the last UID.
    """

    def __init__(self, config: ImapConfig, store: StateStore) -> None:
        self.config = config
        self.store = store
        self.where = f"{config.username}@{config.host}:{config.effective_port}/{config.folder}"
        self.mailbox_key = f"imap://{self.where}"
        self._warned_plaintext = False

    def run(
        self, on_mail: MailCallback, stop: threading.Event, on_flags: FlagCallback | None = None
    ) -> None:
        """Watch the folder until ``stop`` is set; see ``MailboxWatcher.run``.

        Raises:
            AuthenticationError: The server rejected the login; no retry.
            ConfigError: The server lacks STARTTLS although ``starttls`` is set.
        """
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s)
        # Kept across reconnects, so a change made while disconnected is reported.
        tracker = SeenTracker(on_flags, "imap")
        while not stop.is_set():
            try:
                self._session(on_mail, stop, backoff, tracker)
            except MailpushError:
                raise
            except ssl.SSLCertVerificationError as exc:
                delay = backoff.next_delay()
                log.warning(
                    "imap: certificate of %s rejected (%s); set ca_file if the server uses a "
                    "private CA; retrying in %.1f s",
                    self.config.host,
                    exc.verify_message,
                    delay,
                )
                stop.wait(delay)
            except (OSError, IMAPClientAbortError) as exc:
                # Connection lost, refused or timed out.
                delay = backoff.next_delay()
                log.info(
                    "imap: connection to %s failed (%s); reconnecting in %.1f s",
                    self.where,
                    describe_error(exc),
                    delay,
                )
                stop.wait(delay)
            except IMAPClientError as exc:
                # The server returned NO or BAD, such as for a folder that does not exist.
                delay = backoff.next_delay()
                log.warning(
                    "imap: %s: %s; reconnecting in %.1f s", self.where, describe_error(exc), delay
                )
                stop.wait(delay)
            except Exception:
                delay = backoff.next_delay()
                log.exception(
                    "imap: unexpected error on %s; reconnecting in %.1f s", self.where, delay
                )
                stop.wait(delay)

    def set_seen(self, mail_id: str, seen: bool) -> bool:
        r"""Set or clear ``\Seen`` on one mail over a short connection; see ``MailboxWatcher``.

        The connection logs in, selects the folder read-write, checks that its
        UIDVALIDITY is the one in ``mail_id``, stores the flag and logs out.
        Every failure, a rejected login included, is logged and returns False.
        """
        uid_pair = _parse_mail_id(mail_id)
        if uid_pair is None:
            log.warning(
                "imap: %r is not an IMAP mail id (UIDVALIDITY-UID); read state not changed",
                mail_id,
            )
            return False

        try:
            return self._store_seen(mail_id, *uid_pair, seen)
        except MailpushError as exc:
            log.warning("%s; read state of mail %s not changed", exc, mail_id)
        except (OSError, IMAPClientError) as exc:
            log.warning(
                "imap: setting the read state of mail %s in %s failed (%s)",
                mail_id,
                self.where,
                describe_error(exc),
            )
        return False

    def _store_seen(self, mail_id: str, uidvalidity: int, uid: int, seen: bool) -> bool:
        client = self._connect()
        graceful = False
        try:
            response = client.select_folder(self.config.folder, readonly=False)
            current = int(response.get(b"UIDVALIDITY", 0))
            done = False
            if current != uidvalidity:
                log.warning(
                    "imap: mail %s not found: UIDVALIDITY of %s is now %d; read state not changed",
                    mail_id,
                    self.where,
                    current,
                )
            elif uid not in client.search(["UID", str(uid)]):
                log.warning(
                    "imap: mail %s not found in %s (expunged or moved); read state not changed",
                    mail_id,
                    self.where,
                )
            else:
                done = self._store_flag(client, mail_id, uid, seen)
            graceful = True
            return done
        finally:
            close(client, graceful)

    def _store_flag(self, client: IMAPClient, mail_id: str, uid: int, seen: bool) -> bool:
        if seen:
            client.add_flags([uid], [SEEN], silent=True)
        else:
            client.remove_flags([uid], [SEEN], silent=True)

        # STORE on an expunged UID succeeds without effect (RFC 3501 section
        # 6.4.8), so the flag is checked afterwards.
        if uid not in client.search(["UID", str(uid), "SEEN" if seen else "UNSEEN"]):
            log.warning(
                "imap: mail %s in %s was expunged while being flagged; read state not changed",
                mail_id,
                self.where,
            )
            return False
        log.debug(
            "imap: mail %s in %s marked %s", mail_id, self.where, "seen" if seen else "unseen"
        )
        return True

    def _session(
        self,
        on_mail: MailCallback,
        stop: threading.Event,
        backoff: Backoff,
        tracker: SeenTracker,
    ) -> None:
        """Connect, catch up and watch until ``stop`` is set or the connection fails."""
        client = self._connect()
        graceful = False
        try:
            cursor = self._select(client)
            backoff.reset()
            use_idle = client.has_capability("IDLE")
            log.info(
                "imap: watching %s (UIDVALIDITY %d, last UID %d) with %s",
                self.where,
                cursor.uidvalidity,
                cursor.last_uid,
                "IDLE" if use_idle else f"polling every {self.config.poll_s:g} s",
            )

            next_flags_sync = time.monotonic()
            while not stop.is_set():
                caught_up = self._catch_up(client, cursor, on_mail, stop, tracker)
                if time.monotonic() >= next_flags_sync:
                    self._sync_flags(client, cursor, tracker)
                    next_flags_sync = time.monotonic() + self.config.flags_sync_s

                if not caught_up:
                    stop.wait(self.config.retry_s)
                elif use_idle:
                    if took_unsolicited_exists(client):
                        continue  # announced during our commands; IDLE would not repeat it
                    if self._idle(client, stop, next_flags_sync):
                        next_flags_sync = time.monotonic()
                else:
                    stop.wait(self.config.poll_s)
                    if any(_is_flag_change(r) for r in client.noop()[1]):
                        next_flags_sync = time.monotonic()
            graceful = True
        finally:
            close(client, graceful)

    def _connect(self) -> IMAPClient:
        # Only the first connect of a watcher may log the plaintext warning,
        # so a watcher that reconnects logs it once.
        warn_plaintext = not self._warned_plaintext
        self._warned_plaintext = True
        return connect(self.config, self.where, warn_plaintext=warn_plaintext)

    def _select(self, client: IMAPClient) -> _Cursor:
        """Select the folder read-only and return where to resume."""
        response = client.select_folder(self.config.folder, readonly=True)
        if b"UIDVALIDITY" not in response:
            msg = f"SELECT {self.config.folder} returned no UIDVALIDITY (required by RFC 3501)"
            raise IMAPClientError(msg)
        uidvalidity = int(response[b"UIDVALIDITY"])

        stored = self.store.imap_position(self.mailbox_key)
        if stored is not None and stored.uidvalidity == uidvalidity:
            return _Cursor(uidvalidity, stored.last_uid)

        last_uid = _max_uid(client, response.get(b"UIDNEXT"))
        if stored is None:
            log.info(
                "imap: first start on %s: mail up to UID %d is not pushed", self.where, last_uid
            )
        else:
            # RFC 3501 section 2.3.1.1: a new UIDVALIDITY means the old UIDs are
            # void, so the old position cannot tell which mail is new.
            log.warning(
                "imap: UIDVALIDITY of %s changed from %d to %d; the mail up to UID %d "
                "is taken as handled and not pushed",
                self.where,
                stored.uidvalidity,
                uidvalidity,
                last_uid,
            )
        self.store.set_imap_position(self.mailbox_key, ImapPosition(uidvalidity, last_uid))
        return _Cursor(uidvalidity, last_uid)

    def _catch_up(
        self,
        client: IMAPClient,
        cursor: _Cursor,
        on_mail: MailCallback,
        stop: threading.Event,
        tracker: SeenTracker,
    ) -> bool:
        """Deliver each mail above the last UID in UID order; False if ``on_mail`` raised."""
        # In RFC 3501 (section 9, seq-range) "*" is the highest UID in use and
        # "N:*" equals "*:N", so it matches that UID even when it is below N.
        found = client.search(["UID", f"{cursor.last_uid + 1}:*"])
        uids = sorted(uid for uid in found if uid > cursor.last_uid)

        for uid in uids:
            if stop.is_set():
                break
            mail = self._fetch(client, cursor.uidvalidity, uid)
            if mail is not None:
                try:
                    on_mail(mail)
                except RetryLater as exc:
                    log.debug("imap: mail %s deferred: %s", mail.mail_id, exc)
                    return False
                except Exception:
                    log.exception(
                        "imap: handling mail %s failed; retrying in %.0f s",
                        mail.mail_id,
                        self.config.retry_s,
                    )
                    return False
                tracker.observe(mail.mail_id, mail.seen)
            self.store.mark_imap_handled(self.mailbox_key, cursor.uidvalidity, uid)
            cursor.last_uid = uid
        return True

    def _sync_flags(self, client: IMAPClient, cursor: _Cursor, tracker: SeenTracker) -> None:
        r"""Compare the ``\Seen`` state of the highest handled UIDs with the last one known.

        UID SEARCH is used rather than FETCH FLAGS: imaplib keeps unsolicited
        FETCH responses, keyed by sequence number, until the next FETCH, and
        imapclient merges them into that FETCH's result, keyed by UID.
        """
        high = cursor.last_uid
        low = max(1, high - FLAGS_WINDOW + 1)
        present: list[str] = []
        if high >= 1:
            # Seen first: a mail expunged between the two searches then counts
            # as gone, not as unseen.
            seen = set(client.search(["UID", f"{low}:{high}", "SEEN"]))
            for uid in sorted(client.search(["UID", f"{low}:{high}"])):
                mail_id = f"{cursor.uidvalidity}-{uid}"
                tracker.observe(mail_id, uid in seen)
                present.append(mail_id)
        tracker.retain(present)

    def _fetch(self, client: IMAPClient, uidvalidity: int, uid: int) -> NewMail | None:
        # NOTE: the whole message is held in memory, however large it is.
        response = client.fetch([uid], ["BODY.PEEK[]", "FLAGS"]).get(uid)
        if response is None or b"BODY[]" not in response:
            log.debug("imap: UID %d in %s was expunged before it was fetched", uid, self.where)
            return None

        flags = {flag.lower() for flag in response.get(b"FLAGS", ())}
        mail_id = f"{uidvalidity}-{uid}"
        return NewMail(self.mailbox_key, mail_id, response[b"BODY[]"], b"\\seen" in flags)

    def _idle(self, client: IMAPClient, stop: threading.Event, until: float) -> bool:
        """Wait in IDLE until the server reports a change, a timer runs out or ``stop`` is set.

        The wait also ends at ``until`` (a ``time.monotonic()`` value), when
        the next read-state check is due.

        Returns:
            True if the server reported a flag change.

        Raises:
            IMAPClientError: The server reported a problem (an untagged NO or
                BAD, as Dovecot sends when the selected folder is deleted).
        """
        config = self.config
        client.idle()
        started = last_heard = time.monotonic()
        sock = client.socket()

        quiet = False
        problem = None
        flags_changed = False
        while not stop.is_set():
            now = time.monotonic()
            if now - started >= config.idle_renew_s or now >= until:
                break
            if now - last_heard >= config.noop_every_s:
                quiet = True
                break

            readable, _, _ = select.select([sock], [], [], STOP_CHECK_S)
            if not readable:
                continue
            responses = client.idle_check(timeout=0)
            last_heard = time.monotonic()
            problem = next((r for r in responses if r[0] in (b"NO", b"BAD")), None)
            flags_changed = any(_is_flag_change(r) for r in responses)
            # A readable socket with no complete response is either a closed
            # connection or a partial TLS record; ending IDLE shows which.
            if not responses or problem or flags_changed or any(_ends_idle(r) for r in responses):
                break

        # DONE waits for the tagged reply at most timeout_s, because the socket
        # has that timeout; a dead connection raises here and is reconnected.
        _, late = client.idle_done()
        flags_changed = flags_changed or any(_is_flag_change(r) for r in late)
        if problem:
            text = b" ".join(part for part in problem if isinstance(part, bytes))
            msg = f"server reported during IDLE: {text.decode(errors='replace')}"
            raise IMAPClientError(msg)
        if quiet:
            flags_changed = any(_is_flag_change(r) for r in client.noop()[1]) or flags_changed
        return flags_changed


def took_unsolicited_exists(client: IMAPClient) -> bool:
    """Return True if the server announced new mail in its replies to our last commands.

    A server that learns of a new mail while it runs a command (Dovecot does,
    after its notify delay) sends ``* N EXISTS`` with that command's reply.
    imaplib keeps such a response aside, and IDLE would not announce the mail
    again, so without this check it would wait in IDLE until the next renewal.
    """
    # NOTE: reads imaplib's untagged_responses through imapclient's private _imap.
    return bool(client._imap.untagged_responses.pop("EXISTS", None))


def _max_uid(client: IMAPClient, uidnext: int | None) -> int:
    """Return a UID at or above every UID in the folder."""
    if uidnext:
        return int(uidnext) - 1
    # "UID *" matches the message with the highest UID, if there is one.
    return max(client.search(["UID", "*"]), default=0)


def _ends_idle(response: tuple) -> bool:
    # EXISTS announces new mail (RECENT may or may not come with it); BYE
    # announces that the server closes the connection.
    return (len(response) >= 2 and response[1] == b"EXISTS") or response[0] == b"BYE"


def _parse_mail_id(mail_id: str) -> tuple[int, int] | None:
    """Split ``{uidvalidity}-{uid}`` into two numbers; None if it has another form."""
    uidvalidity, _, uid = mail_id.partition("-")
    if not (uidvalidity.isascii() and uidvalidity.isdigit() and uid.isascii() and uid.isdigit()):
        return None
    if int(uid) < 1:
        return None
    return int(uidvalidity), int(uid)


def _is_flag_change(response: tuple) -> bool:
    # An untagged "* N FETCH (FLAGS (...))". N is a sequence number, not a UID,
    # so the response only shows that some flag changed.
    return len(response) >= 2 and response[1] == b"FETCH"
