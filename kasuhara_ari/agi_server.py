"""A small FastAGI server on asyncio streams: Asterisk connects, sends its ``agi_*`` environment, and
then answers one command at a time.

Written here rather than taken from panoramisk, whose FastAGI server calls ``asyncio.coroutine`` (gone in
Python 3.11) for plain-function routes and can busy-spin when Asterisk closes the connection early.

Everything a peer sends is untrusted and bounded:

* a line is at most ``max_line_bytes`` (the stream buffer is capped, so a 10 MB line costs at most that),
  the environment at most ``max_env_lines`` lines, and all of it must arrive within ``env_timeout_s``
  (a peer that trickles bytes is cut off: no slowloris);
* every command waits at most its timeout for the answer;
* the environment is at most ``max_env_bytes`` in all (Asterisk's own is under 1 KiB);
* at most ``max_sessions`` sessions run at once; more connections are closed at once (the dialplan then
  goes on with ``AGISTATUS=FAILURE``: a call is never held up waiting for a free session);
* a peer address may hold at most ``max_sessions_per_peer`` sessions that have not yet proved they are a
  real channel (:meth:`AgiSession.vouched`): one hostile host cannot fill ``max_sessions`` and lock out
  Asterisk, whose sessions prove themselves within milliseconds and then stop counting against it;
* if ``allowed_peers`` is set, only those addresses/networks may connect at all;
* end of stream is an exception, never an empty read in a loop, so a peer that goes away mid-session ends
  the session instead of spinning.

Protocol facts (Asterisk 22, verified): a response is ``200 result=N [(data)] [key=value]``; ``510`` is an
unknown command, ``520-``…``520 End of proper usage.`` a usage error, ``511`` a command refused because
the channel has hung up. When the channel hangs up, Asterisk sends a bare ``HANGUP`` line once, between
responses. After the hangup the channel is only destroyed once the session closes, so a session that saw
the hangup should end promptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .safe import clean_log_value

log = logging.getLogger(__name__)

_ENV_KEY = re.compile(r"agi_[a-z0-9_]{1,64}")
_RESPONSE = re.compile(r"200 result=(-?\d+)((?: .*)?)")


class AgiError(Exception):
    """The session cannot go on."""


class AgiClosed(AgiError):
    """Asterisk closed the connection."""


class AgiHangup(AgiError):
    """The channel hung up (``HANGUP`` notification or ``511``)."""


class AgiTimeout(AgiError):
    """No complete answer in time."""


class AgiProtocolError(AgiError):
    """The peer sent something that is not FastAGI (too long, garbage, wrong order)."""


class AgiCommandError(AgiError):
    """Asterisk refused a command (``510`` unknown, ``520`` usage)."""


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_peers(values: Iterable[str]) -> tuple[IpNetwork, ...]:
    """``agi.allowed_peers``: addresses or CIDR networks (``127.0.0.1``, ``10.0.0.0/24``, ``::1``).

    ValueError names the entry (cleaned: config may come from anywhere)."""
    nets: list[IpNetwork] = []
    for value in values:
        try:
            nets.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"agi.allowed_peers: {clean_log_value(value)} is not an IP address or network"
            ) from None
    return tuple(nets)


def peer_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's IP (an IPv4-mapped IPv6 address as IPv4), None if unparsable."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class AgiLimits:
    max_sessions: int = 200
    max_line_bytes: int = 16384
    max_env_lines: int = 256
    #: The whole environment (Asterisk's is ~600 bytes plus caller ID and arguments).
    max_env_bytes: int = 16384
    #: Sessions per peer address that have not proved they are a real channel yet.
    max_sessions_per_peer: int = 20
    #: Empty: every peer may connect.
    allowed_peers: tuple[IpNetwork, ...] = field(default=())
    env_timeout_s: float = 5.0
    command_timeout_s: float = 5.0
    close_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_line_bytes", "max_env_lines", "max_sessions_per_peer"):
            if getattr(self, name) < 1:
                raise ValueError(f"agi.{name} must be at least 1")
        if self.max_line_bytes < 256:
            raise ValueError("agi.max_line_bytes must be at least 256")
        if self.max_env_bytes < 256:
            raise ValueError("agi.max_env_bytes must be at least 256")
        for name in ("env_timeout_s", "command_timeout_s", "close_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"agi.{name} must be positive")

    def peer_allowed(self, host: str) -> bool:
        if not self.allowed_peers:
            return True
        addr = peer_address(host)
        return addr is not None and any(addr in net for net in self.allowed_peers)


@dataclass(frozen=True)
class AgiResponse:
    """One ``200`` response: ``result``, the text in parentheses (``data``) and what follows (``extra``)."""

    result: int
    data: str | None = None
    extra: str = ""


def parse_response(line: str) -> AgiResponse:
    """Parse ``200 result=1 (value) endpos=123``; :class:`AgiProtocolError` for anything else.

    The value of ``GET VARIABLE`` may itself contain parentheses, so it runs to the last ``)``.
    """
    m = _RESPONSE.fullmatch(line)
    if m is None:
        raise AgiProtocolError(f"not an AGI response: {clean_log_value(line)}")
    result, rest = int(m.group(1)), m.group(2)
    data: str | None = None
    if rest.startswith(" (") and ")" in rest:
        end = rest.rindex(")")
        data, rest = rest[2:end], rest[end + 1 :]
    return AgiResponse(result, data, rest.strip())


def parse_env_line(line: str) -> tuple[str, str] | None:
    """``agi_key: value`` → (key, value); None for a line that is not an AGI variable."""
    key, sep, value = line.partition(":")
    if not sep or not _ENV_KEY.fullmatch(key):
        return None
    return key, value[1:] if value.startswith(" ") else value


class LogThrottle:
    """One log line per ``interval`` seconds for a flood of bad sessions; counts what it held back."""

    def __init__(self, interval: float = 5.0) -> None:
        self._interval = interval
        self._next = 0.0
        self._held = 0

    def allow(self) -> int | None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return None
        self._next = now + self._interval
        held, self._held = self._held, 0
        return held


class AgiSession:
    """One FastAGI connection after its environment was read: send commands, read their answers."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        env: Mapping[str, str],
        limits: AgiLimits,
        peer: str,
        *,
        on_vouched: Callable[[], None] | None = None,
        accepted_at: float | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.env = env
        self.limits = limits
        self.peer = peer
        #: When the connection was accepted (``time.monotonic``): the notice's setup delay counts from here.
        self.accepted_at = time.monotonic() if accepted_at is None else accepted_at
        self._on_vouched = on_vouched
        #: Asterisk said ``HANGUP`` (or refused a command with 511): the channel is gone.
        self.hung_up = False
        self.commands = 0

    def vouched(self) -> None:
        """The handler has proved (through AMI) that a real channel runs this session: it no longer counts
        against its peer's ``max_sessions_per_peer``."""
        if self._on_vouched is not None:
            callback, self._on_vouched = self._on_vouched, None
            callback()

    async def command(self, text: str, *, timeout: float | None = None) -> AgiResponse:
        """Send one command and return its ``200`` response.

        Raises :class:`AgiHangup` on ``511`` (channel hung up), :class:`AgiCommandError` on ``510``/``520``,
        :class:`AgiTimeout`, :class:`AgiClosed` or :class:`AgiProtocolError`. A ``HANGUP`` notification
        before the response is noted (``hung_up``) and the response still read.
        """
        if "\n" in text or "\r" in text or not text.isprintable():
            raise ValueError("an AGI command is one printable line")
        limit = timeout if timeout is not None else self.limits.command_timeout_s
        self.commands += 1
        self._writer.write(text.encode("utf-8") + b"\n")
        try:
            async with asyncio.timeout(limit):
                await self._writer.drain()
                return await self._read_response()
        except TimeoutError:
            raise AgiTimeout(f"no answer to {text.split(' ', 1)[0]} within {limit:g}s") from None
        except (ConnectionError, OSError) as exc:
            raise AgiClosed(f"connection lost: {type(exc).__name__}") from None

    async def _read_response(self) -> AgiResponse:
        while True:
            line = await read_line(self._reader)
            if line == "HANGUP":
                self.hung_up = True
                continue
            if line.startswith("200 "):
                return parse_response(line)
            if line.startswith("511"):
                self.hung_up = True
                raise AgiHangup("the channel has hung up (511)")
            if line.startswith("510"):
                raise AgiCommandError("Asterisk does not know the command (510)")
            if line.startswith("520"):
                # A usage error comes as 520-… lines ending in "520 End of proper usage."; bounded by the
                # caller's timeout and the line limit.
                while not line.startswith("520 "):
                    line = await read_line(self._reader)
                raise AgiCommandError("Asterisk refused the command's syntax (520)")
            raise AgiProtocolError(f"unexpected line {clean_log_value(line)}")


async def read_line(reader: asyncio.StreamReader) -> str:
    """One ``\\n``-terminated line (without it); raises instead of ever returning an empty read at EOF."""
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        raise AgiClosed("connection closed" + (" mid-line" if exc.partial else "")) from None
    except asyncio.LimitOverrunError:
        raise AgiProtocolError("line longer than the limit") from None
    except (ConnectionError, OSError) as exc:
        raise AgiClosed(f"connection lost: {type(exc).__name__}") from None
    return raw.rstrip(b"\r\n").decode("utf-8", "backslashreplace")


async def read_environment(reader: asyncio.StreamReader, limits: AgiLimits) -> dict[str, str]:
    """The ``agi_*`` variables up to the blank line; bounded in lines, line length, total size and time.

    The first occurrence of a key wins: Asterisk sends ``agi_channel`` and ``agi_uniqueid`` before the
    caller-controlled ``agi_callerid``/``agi_calleridname``, so a caller name that smuggled in a newline
    cannot replace them. Lines that are not ``agi_key: value`` are ignored (and logged once).
    """
    env: dict[str, str] = {}
    odd = 0
    size = 0
    try:
        async with asyncio.timeout(limits.env_timeout_s):
            for _ in range(limits.max_env_lines):
                line = await read_line(reader)
                if line == "":
                    break
                size += len(line) + 1
                if size > limits.max_env_bytes:
                    raise AgiProtocolError(f"environment larger than {limits.max_env_bytes} bytes")
                parsed = parse_env_line(line)
                if parsed is None or parsed[0] in env:
                    odd += 1
                    continue
                env[parsed[0]] = parsed[1]
            else:
                raise AgiProtocolError(f"environment longer than {limits.max_env_lines} lines")
    except TimeoutError:
        raise AgiTimeout(f"environment incomplete after {limits.env_timeout_s:g}s") from None
    if odd:
        log.warning("agi event=odd_environment lines=%d (ignored; first value of a key kept)", odd)
    if "agi_request" not in env and "agi_network" not in env:
        raise AgiProtocolError("no AGI environment")
    return env


Handler = Callable[[AgiSession], Awaitable[None]]


@dataclass
class AgiServerStats:
    accepted: int = 0
    completed: int = 0
    refused_busy: int = 0
    refused_peer_limit: int = 0
    refused_not_allowed: int = 0
    malformed: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class AgiServer:
    """Accepts FastAGI connections and runs ``handler(session)`` for each, within :class:`AgiLimits`.

    :meth:`serve` owns the listening socket and every session task: cancelling it stops accepting, gives
    running sessions ``drain_s`` to finish, then cancels the rest.
    """

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        limits: AgiLimits | None = None,
        *,
        drain_s: float = 10.0,
    ) -> None:
        self._handler = handler
        self.host = host
        self.port = port
        self.limits = limits or AgiLimits()
        self.drain_s = drain_s
        self.stats = AgiServerStats()
        self._sessions: set[asyncio.Task[None]] = set()
        #: Sessions per peer host that have not vouched for themselves yet.
        self._unproven: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._bad_log = LogThrottle()
        self._busy_log = LogThrottle()
        self._peer_log = LogThrottle()
        self._failed_log = LogThrottle(1.0)
        self.listening = asyncio.Event()

    @property
    def active(self) -> int:
        return len(self._sessions)

    async def serve(self) -> None:
        """Listen until cancelled (``OSError`` if the address is taken)."""
        self._server = await asyncio.start_server(
            self._connected, self.host, self.port, limit=self.limits.max_line_bytes
        )
        sockets = self._server.sockets or ()
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info(
            "agi event=listening address=%s:%d max_sessions=%d max_sessions_per_peer=%d allowed_peers=%s",
            self.host,
            self.port,
            self.limits.max_sessions,
            self.limits.max_sessions_per_peer,
            ",".join(str(n) for n in self.limits.allowed_peers) or "all",
        )
        self.listening.set()
        try:
            await asyncio.Future()  # until cancelled
        finally:
            self._server.close()
            await self._drain()
            log.info("agi event=stopped %s", " ".join(f"{k}={v}" for k, v in self.stats.as_dict().items()))

    async def _drain(self) -> None:
        if self._sessions:
            log.info("agi event=draining sessions=%d timeout_s=%.0f", len(self._sessions), self.drain_s)
            _, pending = await asyncio.wait(set(self._sessions), timeout=self.drain_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=self.limits.close_timeout_s + 1)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio runs this callback in a task of its own; we adopt it so serve() owns it.
        task = asyncio.current_task()
        assert task is not None
        accepted_at = time.monotonic()
        host, peer = _peer_name(writer)
        if not self.limits.peer_allowed(host):
            self.stats.refused_not_allowed += 1
            self._refused_log("not_allowed", peer)
            await self._close(writer)
            return
        if self._unproven.get(host, 0) >= self.limits.max_sessions_per_peer:
            self.stats.refused_peer_limit += 1
            self._refused_log("max_sessions_per_peer", peer)
            await self._close(writer)
            return
        if len(self._sessions) >= self.limits.max_sessions:
            self.stats.refused_busy += 1
            held = self._busy_log.allow()
            if held is not None:
                log.error(
                    "agi event=refused reason=max_sessions max_sessions=%d peer=%s suppressed=%d",
                    self.limits.max_sessions,
                    peer,
                    held,
                )
            await self._close(writer)
            return
        self._sessions.add(task)
        self._unproven[host] = self._unproven.get(host, 0) + 1
        unproven = True

        def vouched() -> None:
            nonlocal unproven
            if unproven:
                unproven = False
                self._release(host)

        self.stats.accepted += 1
        try:
            await self._session(reader, writer, peer, vouched, accepted_at)
        finally:
            vouched()
            self._sessions.discard(task)
            await self._close(writer)

    def _release(self, host: str) -> None:
        left = self._unproven.get(host, 0) - 1
        if left > 0:
            self._unproven[host] = left
        else:
            self._unproven.pop(host, None)

    def _refused_log(self, reason: str, peer: str) -> None:
        held = self._peer_log.allow()
        if held is not None:
            log.error(
                "agi event=refused reason=%s peer=%s max_sessions_per_peer=%d suppressed=%d",
                reason,
                clean_log_value(peer),
                self.limits.max_sessions_per_peer,
                held,
            )

    async def _session(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        vouched: Callable[[], None],
        accepted_at: float,
    ) -> None:
        try:
            env = await read_environment(reader, self.limits)
        except AgiError as exc:
            self.stats.malformed += 1
            held = self._bad_log.allow()
            if held is not None:
                log.warning(
                    "agi event=bad_session peer=%s error=%s suppressed=%d",
                    peer,
                    clean_log_value(f"{type(exc).__name__}: {exc}", max_chars=120),
                    held,
                )
            return
        session = AgiSession(
            reader, writer, env, self.limits, peer, on_vouched=vouched, accepted_at=accepted_at
        )
        try:
            await self._handler(session)
            self.stats.completed += 1
        except AgiError as exc:
            self.stats.failed += 1
            held = self._failed_log.allow()
            if held is not None:
                log.warning(
                    "agi event=session_failed peer=%s error=%s suppressed=%d",
                    peer,
                    clean_log_value(f"{type(exc).__name__}: {exc}", max_chars=120),
                    held,
                )
        except Exception:
            self.stats.failed += 1
            log.exception("agi event=handler_bug peer=%s", peer)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            async with asyncio.timeout(self.limits.close_timeout_s):
                await writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError):
            writer.transport.abort()


def _peer_name(writer: asyncio.StreamWriter) -> tuple[str, str]:
    """(host, host:port) of the peer; ("?", "?") if the socket has none."""
    with contextlib.suppress(Exception):
        host, port = writer.get_extra_info("peername")[:2]
        return str(host), f"{host}:{port}"
    return "?", "?"
