"""An MRD (ISMRMRD streaming) client: send a raw ISMRMRD file to a server, collect its reply.

It does what a FIRE-style scanner client does: config, the file's XML header as stored,
optional JSON parameters, the acquisitions, CLOSE; images and text notices come back on the
same socket until the server's CLOSE. ``recon-plugin stream`` runs it against ``recon-plugin
serve``, python-ismrmrd-server with the FIRE module, or any MRD v1 server; the tests and
``bench speed`` call :func:`stream_file`.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import ismrmrd
from ismrmrd.serialization import (
    ConfigFile,
    ISMRMRDMessageID,
    ProtocolDeserializer,
    ProtocolSerializer,
)

from .wire import CONFIG_FILE_SIZE


@dataclass
class StreamReply:
    """What a server sent back for one streamed file."""

    images: list[ismrmrd.Image] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # "INFO ..." / "WARNING ..." / "ERROR ..."
    cut: str | None = None  # why the reply ended without the server's CLOSE, else None
    unsent: str | None = None  # why sending stopped before the file's end, else None
    unreadable: str | None = None  # the raw file's acquisition that could not be read, else None
    timed_out: float | None = None  # seconds without progress either way after which it gave up

    @property
    def errors(self) -> list[str]:
        """The server's ``ERROR ...`` notices."""
        return [t for t in self.texts if t.startswith("ERROR")]


@dataclass
class RawFile:
    """A raw ISMRMRD file opened for streaming: its header XML as stored and its acquisitions."""

    path: Path
    xml: bytes
    count: int
    dataset: str

    def acquisitions(self) -> Iterator[ismrmrd.Acquisition]:
        """The acquisitions in stored order, read one at a time (a 3D scan need not fit in
        memory twice); UnreadableAcquisition naming the file and the index where one cannot
        be read (a file damaged past its header)."""
        try:
            ds = ismrmrd.Dataset(str(self.path), self.dataset, create_if_needed=False)
        except Exception as e:  # h5py's and ismrmrd's errors vary
            raise UnreadableAcquisition(f"{self.path}: cannot be opened again to read its "
                                        f"acquisitions ({type(e).__name__}: {e})") from e
        try:
            for i in range(self.count):
                try:
                    acq = ds.read_acquisition(i)
                except Exception as e:  # h5py's and ismrmrd's errors for damaged records vary
                    raise UnreadableAcquisition(
                        f"{self.path}: acquisition {i} of {self.count} cannot be read "
                        f"({type(e).__name__}: {e})") from e
                yield acq
        finally:
            ds.close()


class UnreadableAcquisition(ValueError):
    """A raw file's acquisition that cannot be read while it is streamed."""


def open_raw(path: Path, dataset: str = "dataset") -> RawFile:
    """Check that ``path`` is a raw ISMRMRD HDF5 file: group ``dataset`` (else the file's one
    group with an XML header and acquisitions, the rule ``recon`` reads by) with a header and
    acquisitions; ValueError naming what is missing (FileNotFoundError where it is not there)."""
    from ..io.noise_dependency import ismrmrd_group

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give one raw ISMRMRD file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such raw file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 file ({e}); `recon-plugin stream` "
                         "sends raw ISMRMRD HDF5 files") from None
    with f:
        found = ismrmrd_group(f, dataset)
        if found is None and "kspace" in f:
            raise ValueError(f"{path} is a fastMRI file (no ISMRMRD group '{dataset}'): a "
                             "stream carries ISMRMRD acquisitions; reconstruct it with "
                             "`recon-plugin recon`")
        if found is None:
            raise ValueError(f"{path} has no ISMRMRD group with an XML header ('xml') and "
                             f"acquisitions ('data'); top level: "
                             f"{', '.join(sorted(f)) or 'empty'}")
        group = f[found]
        try:
            count = len(group["data"])
            xml = group["xml"][0]
        except (IndexError, ValueError, TypeError, OSError) as e:
            raise ValueError(f"{path}: the ISMRMRD header '{found}/xml' cannot be read "
                             f"({type(e).__name__}: {e})") from None
        if not count:
            raise ValueError(f"{path}: group '{found}' holds no acquisitions")
    return RawFile(path, xml if isinstance(xml, bytes) else str(xml).encode("utf-8"), count,
                   found)


def stream_file(
    address: tuple[str, int], raw: Path | RawFile, config: str = "auto",
    slice_gap_s: float = 0.0, dataset: str = "dataset", timeout: float | None = 120.0,
    parameters: dict | None = None,
) -> StreamReply:
    """Stream ``raw`` to the MRD server at ``address`` (host, port) and collect its reply until
    its CLOSE or the end of the connection.

    ``config``: the CONFIG_FILE name (a protocol name, or ``auto``: header matching);
    ``parameters``: sent as one JSON TEXT before the acquisitions (e.g. ``{"method":
    "cg-sense"}``); ``slice_gap_s``: a pause after each ACQ_LAST_IN_SLICE acquisition, as a
    scanner that spends that long acquiring the next slice; ``timeout``: seconds to wait for
    the connection, and without progress either way (nothing sent, nothing received) before
    giving up (``StreamReply.timed_out``; None: no limit). What arrived before any failure is
    in the reply. A server that is not there: ConnectionError naming the address.
    """
    raw = raw if isinstance(raw, RawFile) else open_raw(raw, dataset)
    if len(config.encode("utf-8")) >= CONFIG_FILE_SIZE:
        raise ValueError(f"config name of {len(config.encode('utf-8'))} bytes: an MRD config "
                         f"name holds at most {CONFIG_FILE_SIZE - 1}")
    host, port = address
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as e:
        raise ConnectionError(f"no MRD server answers at {host}:{port} "
                              f"({e.strerror or e}): is `recon-plugin serve` (or another MRD "
                              "server) running there?") from None
    # no socket timeout: a server may read for long before it answers (a 3D scan, the pauses
    # between slices); the watchdog below gives up on silence either way instead
    sock.settimeout(None)
    reply, done, moved = StreamReply(), threading.Event(), _Progress()
    wfile, rfile = sock.makefile("wb"), sock.makefile("rb")
    sender = threading.Thread(target=_send, name="mrd-client-send", daemon=True,
                              args=(sock, wfile, raw, config, parameters, slice_gap_s, reply,
                                    moved, done))
    watchdog = threading.Thread(target=_watch, name="mrd-client-watch", daemon=True,
                                args=(sock, timeout, reply, moved, done))
    sender.start()
    if timeout is not None:
        watchdog.start()
    try:
        for obj in ProtocolDeserializer(rfile).deserialize():
            moved.now()
            if isinstance(obj, ismrmrd.Image):
                reply.images.append(obj)
            elif isinstance(obj, str):
                reply.texts.append(obj)
    except (OSError, EOFError, ValueError, struct.error) as e:  # the deserializer's end: CLOSE
        reply.cut = f"{type(e).__name__}: {e}"  # or, as here, a cut or unknown message
    finally:
        done.set()  # the sender's pause ends, the watchdog stops
        if sender.is_alive():  # a server that stopped reading: unblock the sender's write
            _quietly(sock.shutdown, socket.SHUT_RDWR)
        sender.join()
        for closing in (wfile.close, rfile.close, sock.close):
            _quietly(closing)
    return reply


@dataclass
class _Progress:
    """When :func:`stream_file` last sent or received a message, and whether it is pausing
    between slices (``--slice-gap``: its own wait, no silence of the server's)."""

    at: float = field(default_factory=time.monotonic)
    pausing: bool = False

    def now(self) -> None:
        self.at = time.monotonic()


def _send(sock: socket.socket, wfile, raw: RawFile, config: str, parameters: dict | None,
          slice_gap_s: float, reply: StreamReply, moved: _Progress,
          done: threading.Event) -> None:
    """The sending half of :func:`stream_file`. Whatever stops it before its CLOSE (the file,
    the server, the reply's end) half-closes the connection without one, so that the server
    abandons the scan rather than reconstructing a part of it as if whole, and neither side
    waits for the other; why goes into ``reply``."""
    closed = False
    try:
        out = ProtocolSerializer(wfile)
        out.serialize(ConfigFile(config))
        wfile.write(struct.pack("<HI", ISMRMRDMessageID.HEADER, len(raw.xml)) + raw.xml)
        if parameters:
            out.serialize(json.dumps(parameters))
        for acq in raw.acquisitions():
            out.serialize(acq)
            moved.now()
            if slice_gap_s and acq.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
                wfile.flush()
                moved.pausing = True
                ended = done.wait(slice_gap_s)
                moved.pausing = False
                moved.now()
                if ended:
                    raise ConnectionError("the server's reply ended before the file was sent")
        out.close()  # CLOSE, flushed
        closed = True
    except UnreadableAcquisition as e:
        reply.unreadable = str(e)
    except Exception as e:  # noqa: BLE001 - the server gone, a socket error: said, not raised
        reply.unsent = f"{type(e).__name__}: {e}"
    finally:
        moved.now()
        if not closed:
            _quietly(wfile.flush)
            _quietly(sock.shutdown, socket.SHUT_WR)


def _watch(sock: socket.socket, timeout: float, reply: StreamReply, moved: _Progress,
           done: threading.Event) -> None:
    """Give up on the connection (``reply.timed_out``) once nothing was sent or received for
    ``timeout`` seconds, the pauses between slices not counted: shut the socket down, which
    ends the reading and the sending."""
    while not done.wait(min(1.0, timeout / 4)):
        if not moved.pausing and time.monotonic() - moved.at > timeout:
            reply.timed_out = timeout
            _quietly(sock.shutdown, socket.SHUT_RDWR)
            return


def _quietly(fn, *args) -> None:
    """``fn(*args)``, where an OSError only means the socket is already gone."""
    try:
        fn(*args)
    except OSError:
        pass
