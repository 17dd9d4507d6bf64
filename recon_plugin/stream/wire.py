"""MRD v1 wire protocol, reading side: length-checked messages from a socket, and the
bounded inbox a reader thread fills for a session."""

from __future__ import annotations

import codecs
import ctypes
import re
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import ismrmrd
from ismrmrd.serialization import ISMRMRDMessageID as MSG

from .options import (
    ClientGone,
    IdleTimeout,
    Limits,
    ProtocolViolation,
    ServerStopping,
    StreamError,
)

_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")
# the encoding an XML declaration names (<?xml version="1.0" encoding="ISO-8859-1"?>)
_XML_ENCODING = re.compile(rb"""\s*<\?xml\s[^>]*?\bencoding\s*=\s*["']([A-Za-z][\w.-]*)["']""")
CONFIG_FILE_SIZE = 1024  # an MRD CONFIG_FILE message: a fixed, NUL-padded payload
_ACQ_HEAD = ctypes.sizeof(ismrmrd.AcquisitionHeader)
_WAVE_HEAD = ctypes.sizeof(ismrmrd.WaveformHeader)


@dataclass
class Message:
    id: int
    payload: Any
    nbytes: int
    t: float  # arrival (time.perf_counter) of the message's last byte


class MrdReader:
    """Reads MRD messages from a socket, checking every length before reading the payload.

    The socket's timeout bounds the wait for each piece of data and, from its first byte, the
    whole of each message: a client that trickles a message byte by byte (each within the
    timeout) would otherwise hold its connection slot for ever. ``idle_timeout``: the
    socket's timeout from the first complete message on (before it, the shorter one the
    socket was given: a connection that never speaks frees its slot soon). ``admit(n, what)``
    is called before the ``n`` bytes of a message's payload are allocated (the connection's
    :meth:`Inbox.admit`: waits for room, or refuses the message by raising)."""

    def __init__(self, sock: socket.socket, limits: Limits, idle_timeout: float | None = None,
                 admit: Callable[[int, str], None] | None = None):
        self.sock, self.limits, self.idle_timeout = sock, limits, idle_timeout
        self.admit = admit
        self._first = True  # no message complete yet
        self._deadline: float | None = None  # the message in flight must be in by then
        self._after: tuple | None = None  # (id, header) of the last sized message: errors

    def _exact(self, n: int, boundary: bool = False) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            if self._deadline is not None:  # wait no longer than the message has left
                left = self._deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    raise IdleTimeout(f"idle timeout: a message not complete "
                                      f"{self.sock.gettimeout():g} s after its first byte (the "
                                      "client sends too slowly)")
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except TimeoutError as e:
                if self._first and got == 0 and boundary:
                    raise IdleTimeout(f"no message within {self.sock.gettimeout():g} s of "
                                      "connecting (serve --first-message-timeout)") from e
                raise IdleTimeout("idle timeout: no data from the client") from e
            except OSError as e:
                raise ClientGone(f"connection lost: {e}") from e
            if k == 0:
                if boundary and got == 0:
                    raise ClientGone("client closed the connection without CLOSE")
                raise ProtocolViolation(f"truncated message: connection closed after {got} of "
                                        f"{n} bytes")
            got += k
            timeout = self.sock.gettimeout()
            if self._deadline is None and timeout is not None:
                self._deadline = time.monotonic() + timeout
        return bytes(buf)

    def _sized(self, what: str) -> bytes:
        """A uint32 length, checked, then that many bytes."""
        (n,) = _U32.unpack(self._exact(4))
        if n > self.limits.max_text_bytes:
            raise ProtocolViolation(f"{what} of {n} bytes exceeds the limit of "
                                    f"{self.limits.max_text_bytes}")
        self._admit(n, f"the {what}")
        return self._exact(n)

    def _admit(self, n: int, what: str) -> None:
        """Make room for the ``n`` bytes of ``what`` about to be read (see ``admit``). The time
        spent waiting for room is the server's, not the client's: the message's deadline moves
        on by as much."""
        if self.admit is not None and n > 0:
            t0 = time.monotonic()
            self.admit(n, what)
            if self._deadline is not None:
                self._deadline += time.monotonic() - t0

    def _text(self, what: str) -> str:
        return _decode(self._sized(what), what)

    def read(self) -> Message:
        self._deadline = None
        (mid,) = _U16.unpack(self._exact(2, boundary=True))
        after, self._after = self._after, None
        lim = self.limits
        if mid == MSG.CONFIG_FILE:
            self._admit(CONFIG_FILE_SIZE, "the config file name")
            payload: Any = _decode(self._exact(CONFIG_FILE_SIZE), "config file name")
            n = CONFIG_FILE_SIZE
        elif mid == MSG.HEADER:
            payload = self._header()
            n = len(payload)
        elif mid in (MSG.CONFIG_TEXT, MSG.TEXT):
            payload = self._text(MSG(mid).name.lower())
            n = len(payload)
        elif mid == MSG.CLOSE:
            payload, n = None, 0
        elif mid == MSG.ACQUISITION:
            head = self._exact(_ACQ_HEAD)
            h = ismrmrd.AcquisitionHeader.from_buffer_copy(head)
            ns, ch, td = int(h.number_of_samples), int(h.active_channels), \
                int(h.trajectory_dimensions)
            over = [f"{v} {what} (at most {cap})" for v, what, cap in (
                (ns, "samples", lim.max_samples), (ch, "channels", lim.max_channels),
                (td, "trajectory dimensions", lim.max_trajectory_dims)) if v > cap]
            if over:
                raise ProtocolViolation(f"acquisition {int(h.scan_counter)} exceeds the server "
                                        f"limits: {', '.join(over)}")
            n = ns * td * 4 + ns * ch * 8
            if n > lim.max_message_bytes:
                raise ProtocolViolation(f"acquisition of {n} bytes exceeds the limit")
            self._admit(n, f"acquisition {int(h.scan_counter)} ({ns} samples x {ch} channels)")
            payload = ismrmrd.Acquisition.from_bytes(head + self._exact(n))
            self._after = (mid, h)
        elif mid == MSG.WAVEFORM:
            h = ismrmrd.WaveformHeader.from_buffer_copy(self._exact(_WAVE_HEAD))
            n = int(h.number_of_samples) * int(h.channels) * 4
            if n > lim.max_message_bytes:
                raise ProtocolViolation(f"waveform of {n} bytes exceeds the limit")
            self._admit(n, "a waveform")
            self._exact(n)
            payload = None
            self._after = (mid, h)
        elif mid in (MSG.IMAGE, MSG.NDARRAY):
            raise ProtocolViolation(f"{MSG(mid).name} input is not supported (raw "
                                    "acquisitions only)")
        else:
            raise ProtocolViolation(f"unknown message id {mid}" + (
                f" right after {_read_as(*after)}: if that message carried more data than its "
                "header declares, the stream is out of step from there" if after else ""))
        if self._first:  # the client speaks: from now on the idle timeout
            self._first = False
            if self.idle_timeout is not None:
                self.sock.settimeout(self.idle_timeout)
        return Message(int(mid), payload, n, time.perf_counter())

    def _header(self) -> str | bytes:
        """The XML header: its text where it is UTF-8, else its bytes where its XML declaration
        names the encoding it is in (e.g. ISO-8859-1 with an accented name: the XML parsers
        decode it by that, as ``ismrmrd``'s own deserializer does)."""
        raw = self._sized("header").split(b"\x00", 1)[0]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        declared = _XML_ENCODING.match(raw)
        name = declared.group(1).decode("ascii") if declared else None
        try:
            if name is not None and codecs.lookup(name).name != "utf-8":
                raw.decode(name)
                return raw
        except (LookupError, UnicodeDecodeError):
            raise ProtocolViolation(f"header is neither UTF-8 text nor {name} text, the "
                                    "encoding its XML declaration names") from None
        raise ProtocolViolation("header is not UTF-8 text (nor does its XML declaration name "
                                "another encoding)")


def _read_as(mid: int, h: Any) -> str:
    """What an acquisition or waveform (its header ``h``) was read as, for an error that
    follows it (formatted only then: not per message)."""
    if mid == MSG.ACQUISITION:
        return (f"acquisition {int(h.scan_counter)}, read as the {int(h.number_of_samples)} "
                f"samples x {int(h.active_channels)} channels and "
                f"{int(h.trajectory_dimensions)} trajectory dimensions its header declares")
    return (f"a waveform, read as the {int(h.number_of_samples)} samples x "
            f"{int(h.channels)} channels its header declares")


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.split(b"\x00", 1)[0].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolViolation(f"{what} is not UTF-8 text") from e


class MemoryBudget(Protocol):
    """The server's memory limit as a connection's read-ahead counts against it
    (:class:`~recon_plugin.stream.engine.StreamEngine`)."""

    def hold_read_ahead(self, nbytes: int, what: str, refuse: bool = True) -> bool: ...

    def free_read_ahead(self, nbytes: int) -> None: ...


class Inbox:
    """Messages read ahead by the reader thread: at most ``max_bytes`` while the session is
    busy (back-pressure on the client), each counted in ``budget`` (the server's memory
    limit) from before it is read (:meth:`admit`) until the session takes it."""

    def __init__(self, max_bytes: int, stop: threading.Event,
                 budget: MemoryBudget | None = None):
        self._items: deque[tuple[Message | StreamError, int]] = deque()
        self._bytes, self._max, self._stop = 0, max_bytes, stop
        self._budget = budget
        self._pending = 0  # counted for the message being read, not yet put
        self._taking = False  # the session waits in get() for the next message
        self._cv = threading.Condition()
        self.closed = False

    def admit(self, nbytes: int, what: str) -> None:
        """Count a message of ``nbytes`` (``what``) about to be read, before it is allocated.
        While the session is busy (messages wait here, or it works on one), wait for room:
        within ``max_bytes``, and in the budget. Once it waits for this very message, the
        budget has room or the message is refused (ProtocolViolation naming its size and the
        limit), as is one larger than the whole limit, without waiting for the budget."""
        with self._cv:
            while True:
                if self.closed:
                    raise ClientGone("the session ended")
                if not self._items and self._taking:
                    self._count(nbytes, what, refuse=True)
                    break
                if ((not self._items or self._bytes + nbytes <= self._max)
                        and self._count(nbytes, what, refuse=False)):
                    break
                self._cv.wait(0.25)
            self._bytes += nbytes
            self._pending += nbytes

    def _count(self, nbytes: int, what: str, refuse: bool) -> bool:
        return self._budget is None or self._budget.hold_read_ahead(nbytes, what, refuse)

    def _free(self, nbytes: int) -> None:
        self._bytes -= nbytes
        if self._budget is not None and nbytes:
            self._budget.free_read_ahead(nbytes)

    def put(self, item: Message | StreamError) -> bool:
        """Queue ``item`` with the bytes admitted for it; False where the session ended."""
        with self._cv:
            if self.closed:
                return False
            self._items.append((item, self._pending))
            self._pending = 0
            self._cv.notify_all()
            return True

    def get(self) -> Message:
        with self._cv:
            try:
                while True:
                    if self._stop.is_set():
                        raise ServerStopping("server shutting down; the scan was not finished")
                    if self._items:
                        item, n = self._items.popleft()
                        self._free(n)
                        self._cv.notify_all()
                        if isinstance(item, StreamError):
                            try:
                                raise item
                            finally:  # no frame <-> traceback cycle keeping the session alive
                                del item
                        return item
                    if not self._taking:  # a reader waiting for room must count or refuse
                        self._taking = True
                        self._cv.notify_all()
                    self._cv.wait(0.25)
            finally:
                self._taking = False

    def close(self) -> None:
        """End the session's side: what is read ahead is dropped and freed from the budget."""
        with self._cv:
            self.closed = True
            self._items.clear()
            self._free(self._bytes)
            self._pending = 0
            self._cv.notify_all()


def read_loop(reader: MrdReader, inbox: Inbox) -> None:
    while True:
        try:
            msg = reader.read()
        except StreamError as e:
            inbox.put(e)
            return
        except Exception as e:  # noqa: BLE001 - e.g. a header the ismrmrd library rejects
            inbox.put(ProtocolViolation(f"unreadable message: {type(e).__name__}: {e}"))
            return
        if not inbox.put(msg) or msg.id == MSG.CLOSE:
            return
