"""The embedded MQTT broker: amqtt run in its own thread, for a one-machine setup.

The push service starts this broker when no external broker is configured, so
that one machine can run the whole system. The rest of the service stays
synchronous paho-mqtt code, so the broker's asyncio event loop runs in a
dedicated thread named ``mailpush-broker``.

What amqtt 0.12 does and does not do, read from its source and checked by
``tests/test_broker.py``:

- It speaks MQTT 3.1.1 only. It replies to an MQTT 5 CONNECT with a 3.1.1 CONNACK
  carrying return code 1 (unacceptable protocol version) and closes the
  connection, so clients must connect with MQTTv311.
- It keeps sessions, subscriptions and retained messages in memory only, so a
  restart forgets all of them.
- It keeps no offline queue for anonymous clients: with ``allow_anonymous`` on,
  every session counts as anonymous, QoS 1 messages for a disconnected
  ``clean_session=False`` client are dropped, and the session itself is removed
  about a second after the client disconnects. Only clients authenticated from
  the password file get their QoS 1 and 2 messages queued while offline, and
  amqtt delivers those with the retain flag set.
- It sends a connecting client the retained messages of every other client's
  subscriptions; :func:`_broker_class` overrides that, see there.

The protocol's acknowledged outbox (``mailpush.server.outbox``) covers these
gaps, so nothing here depends on the broker's session state.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from mailpush.errors import BrokerError, ConfigError

logger = logging.getLogger(__name__)

THREAD_NAME = "mailpush-broker"
DEFAULT_START_TIMEOUT_S = 10.0
DEFAULT_STOP_TIMEOUT_S = 10.0
SESSION_EXPIRY_S = 7 * 86400

_ANONYMOUS_PLUGIN = "amqtt.plugins.authentication.AnonymousAuthPlugin"
_FILE_PLUGIN = "amqtt.plugins.authentication.FileAuthPlugin"


class EmbeddedBroker:
    """An amqtt broker run in a background thread, started and stopped from sync code.

    The broker binds 127.0.0.1 by default. It rejects any other address while
    anonymous clients are allowed, because an open broker on a network would
    let anyone read every user's mail summaries.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with EmbeddedBroker(port=0) as broker:
            client.connect("127.0.0.1", broker.port)

    Args:
        host: address to listen on (config key ``broker.listen``).
        port: TCP port; 0 picks a free port, readable from :attr:`port` once started.
        allow_anonymous: accept clients without a username.
        password_file: amqtt password file (``user:argon2-hash`` per line); with
            ``allow_anonymous=False`` only the users it lists may connect.

    Raises:
        ConfigError: the address is not loopback and no authentication is
            configured, or the password file is missing.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        allow_anonymous: bool = True,
        password_file: Path | None = None,
    ) -> None:
        _validate_settings(host, port, allow_anonymous, password_file)
        self.host = host
        self._requested_port = port
        self._allow_anonymous = allow_anonymous
        self._password_file = password_file

        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stop_requested = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._bound_port: int | None = None
        self._broker: Any = None

    @property
    def port(self) -> int:
        """The TCP port the broker listens on; the chosen one when 0 was requested."""
        if self._bound_port is not None:
            return self._bound_port
        return self._requested_port

    def config(self) -> dict[str, Any]:
        """Build the amqtt configuration dict for this broker.

        The logging and ``$SYS`` plugins of amqtt's default configuration are
        left out on purpose: its packet logger writes every PUBLISH payload,
        which would put mail summaries into the log.
        """
        plugins: dict[str, Any] = {
            _ANONYMOUS_PLUGIN: {"allow_anonymous": self._allow_anonymous},
        }
        if self._password_file is not None:
            plugins[_FILE_PLUGIN] = {"password_file": str(self._password_file)}

        return {
            # Bounds the memory of persistent sessions that never come back; the
            # protocol asks brokers to keep an agent's session at least 7 days.
            "session_expiry_interval": SESSION_EXPIRY_S,
            "listeners": {
                "default": {"type": "tcp", "bind": _bind_string(self.host, self._requested_port)}
            },
            "plugins": plugins,
        }

    def start(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> None:
        """Start the broker thread and wait until the listener accepts connections.

        Args:
            timeout: seconds to wait for the listener.

        Raises:
            BrokerError: the port is in use, the broker failed to start, or it
                did not start within ``timeout``.
        """
        if self._thread is not None:
            msg = "broker: start() called twice; stop() the running broker first"
            raise BrokerError(msg)

        _check_port_free(self.host, self._requested_port)
        self._ready.clear()
        self._stop_requested.clear()
        self._start_error = None
        self._bound_port = None
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

        if not self._ready.wait(timeout):
            self.stop()
            msg = f"broker: not listening on {self.host}:{self.port} after {timeout:g} s"
            raise BrokerError(msg)
        if self._start_error is not None:
            error = self._start_error
            self._thread.join(DEFAULT_STOP_TIMEOUT_S)
            self._thread = None
            raise _as_broker_error(error, self.host, self._requested_port) from None

        logger.info("embedded broker listening on %s:%d", self.host, self.port)

    def ready(self, timeout: float = 0.0) -> bool:
        """Wait up to ``timeout`` seconds for the broker to accept connections.

        Returns:
            Whether the broker is running and listening.
        """
        if not self._ready.wait(timeout):
            return False
        return self._start_error is None and self._thread is not None

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Shut the broker down and join its thread; calling it again does nothing.

        Args:
            timeout: seconds to wait for the thread to end.
        """
        thread = self._thread
        if thread is None:
            return

        # The flag covers a stop() that comes before _serve() created its event.
        self._stop_requested.set()
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop_event.set)
            except RuntimeError:  # the loop closed between the check and the call
                pass
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("embedded broker thread did not stop within %g s", timeout)
            return

        self._thread = None
        self._ready.clear()
        logger.info("embedded broker stopped")

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        """Run the broker's event loop until :meth:`stop`; the thread's target."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()
            self._loop = None

    async def _serve(self) -> None:
        """Start amqtt, report readiness, then wait for the stop request and shut down."""
        self._stop_event = asyncio.Event()
        try:
            broker = _broker_class()(self.config(), loop=asyncio.get_running_loop())
            await broker.start()
        except Exception as exc:  # reported to the caller of start() as one line
            self._start_error = exc
            self._ready.set()
            return

        self._bound_port = _listening_port(broker) or self._requested_port
        self._broker = broker
        self._ready.set()
        if not self._stop_requested.is_set():
            await self._stop_event.wait()

        try:
            await broker.shutdown()
        except Exception as exc:  # shutting down must not leave the thread hanging
            logger.warning("embedded broker: shutdown failed: %s", exc)
        finally:
            self._broker = None

    def connected_clients(self, timeout: float = 5.0) -> set[str]:
        """Return the client ids of the sessions that are connected right now.

        Args:
            timeout: seconds to wait for the broker thread's reply.

        Returns:
            The connected client ids; empty when the broker is not running.
        """
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or loop.is_closed():
            return set()

        async def snapshot() -> set[str]:
            return {
                client_id
                for client_id, (session, _handler) in broker.sessions.items()
                if session.transitions.state == "connected"
            }

        return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(timeout)


def _broker_class() -> type:
    """Return amqtt's Broker with the retained-message leak fixed.

    amqtt 0.12.1 sends every connecting client the retained messages that match
    any topic filter of any client, not only its own: ``_handle_client_session``
    calls ``_publish_retained_messages_for_subscription`` for each filter in
    the broker's subscription map. A client would then read other users'
    retained states and policies. The override sends retained messages only
    for filters that the session itself holds.
    """
    # Imported here so that a service pointed at an external broker never loads amqtt.
    from amqtt.broker import Broker

    class _OwnFiltersBroker(Broker):  # type: ignore[misc]
        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any
        ) -> None:
            holders = self._subscriptions.get(subscription[0], [])
            if not any(holder.client_id == session.client_id for holder, _qos in holders):
                return
            await super()._publish_retained_messages_for_subscription(subscription, session)

    return _OwnFiltersBroker


def is_loopback(host: str) -> bool:
    """Return whether ``host`` names a loopback address (127.0.0.0/8, ::1 or ``localhost``).

    Other host names are not resolved, so they count as non-loopback.
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _validate_settings(
    host: str, port: int, allow_anonymous: bool, password_file: Path | None
) -> None:
    """Raise :class:`ConfigError` for settings the broker must not start with."""
    if not 0 <= port <= 65535:
        msg = f"broker.listen: invalid port {port}; use 1 to 65535, or 0 for a free port"
        raise ConfigError(msg)

    if not allow_anonymous and password_file is None:
        msg = (
            "broker.accounts_file: missing; without it no client could connect to the "
            "embedded broker; set broker.accounts_file"
        )
        raise ConfigError(msg)

    if password_file is not None and not Path(password_file).is_file():
        msg = f"broker.accounts_file: {password_file} not found; create it or fix the path"
        raise ConfigError(msg)

    authenticated = not allow_anonymous and password_file is not None
    if not is_loopback(host) and not authenticated:
        msg = (
            f"broker.listen: {host!r} is not a loopback address and the broker has no "
            'authentication; set broker.listen = "127.0.0.1", or set broker.accounts_file '
            "(an amqtt password file) so that only listed accounts may connect"
        )
        raise ConfigError(msg)


def _bind_string(host: str, port: int) -> str:
    """Format ``host:port`` for amqtt's listener ``bind`` setting.

    amqtt 0.12 keeps the brackets of ``[::1]:1883`` in the address it passes
    to getaddrinfo, which then fails, so IPv6 addresses go in bare: amqtt
    splits at the last colon, which leaves ``::1`` intact.
    """
    return f"{host.strip('[]')}:{port}"


def _check_port_free(host: str, port: int) -> None:
    """Raise :class:`BrokerError` when ``port`` on ``host`` is already taken.

    amqtt reports a busy port only as a logged traceback and a generic error,
    so the port is tried here first with the same SO_REUSEADDR option amqtt uses.
    """
    if port == 0:
        return

    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bare, port))
        except OSError as exc:
            raise _as_broker_error(exc, host, port) from None


def _as_broker_error(error: BaseException, host: str, port: int) -> BrokerError:
    """Turn a start-up failure, possibly wrapped by amqtt, into a one-line BrokerError."""
    root: BaseException = error
    while root.__cause__ is not None:
        root = root.__cause__

    if isinstance(root, OSError) and root.errno == errno.EADDRINUSE:
        msg = (
            f"broker.listen: port {port} on {host} is already in use; stop the program "
            f'that holds it (ss -ltnp) or set broker.listen = "{host}:PORT" to a free port'

        )
        return BrokerError(msg)
    if isinstance(root, OSError) and root.errno == errno.EACCES:
        msg = f"broker.listen: no permission to listen on port {port}; use a port above 1023"
        return BrokerError(msg)

    detail = str(root).replace("\n", " ") or type(root).__name__
    msg = f"broker: embedded broker failed to start on {host}:{port}: {detail}"
    return BrokerError(msg)


def _listening_port(broker: Any) -> int | None:
    """Return the port amqtt's default listener is bound to, or None if unknown."""
    # NOTE: amqtt exposes no public accessor for the bound socket, so this reads
    # its private ``_servers`` map; a later amqtt may rename it.
    servers = getattr(broker, "_servers", {})
    server = servers.get("default")
    sockets = getattr(getattr(server, "instance", None), "sockets", None) or []
    for sock in sockets:
        return int(sock.getsockname()[1])
    return None
