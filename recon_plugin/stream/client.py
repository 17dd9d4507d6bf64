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
        ds = ismrmrd.Dataset(str(self.path), self.dataset, create_if_needed=False)
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
    """Check that ``path`` is a raw ISMRMRD HDF5 file (group ``dataset`` with an XML header and
    acquisitions); ValueError naming what is missing (FileNotFoundError where it is not there)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such raw file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 file ({e}); `recon-plugin stream` "
                         "sends raw ISMRMRD HDF5 files") from None
    with f:
        if dataset not in f and "kspace" in f:
            raise ValueError(f"{path} is a fastMRI file (no ISMRMRD group '{dataset}'): a "
                             "stream carries ISMRMRD acquisitions; reconstruct it with "
                             "`recon-plugin recon`")
        if dataset not in f:
            raise ValueError(f"{path} has no ISMRMRD group '{dataset}' (top level: "
                             f"{', '.join(sorted(f)) or 'empty'}); give --group for another "
                             "group name")
        group = f[dataset]
        if "xml" not in group:
            raise ValueError(f"{path}: group '{dataset}' has no ISMRMRD header ('xml')")
        if "data" not in group or not len(group["data"]):
            raise ValueError(f"{path}: group '{dataset}' holds no acquisitions")
        xml = group["xml"][0]
        count = len(group["data"])
    return RawFile(path, xml if isinstance(xml, bytes) else str(xml).encode("utf-8"), count,
                   dataset)


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
    the server at a time (connecting, each piece of its reply; None: no limit). A server that
    is not there, or that stays silent for ``timeout``: OSError naming the address.
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
    reply = StreamReply()
    wfile, rfile = sock.makefile("wb"), sock.makefile("rb")

    def send() -> None:
        try:
            out = ProtocolSerializer(wfile)
            out.serialize(ConfigFile(config))
            wfile.write(struct.pack("<HI", ISMRMRDMessageID.HEADER, len(raw.xml)) + raw.xml)
            if parameters:
                out.serialize(json.dumps(parameters))
            for acq in raw.acquisitions():
                out.serialize(acq)
                if slice_gap_s and acq.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
                    wfile.flush()
                    time.sleep(slice_gap_s)
            out.close()  # CLOSE, flushed
        except UnreadableAcquisition as e:  # no CLOSE: the server abandons the scan, it does
            reply.unreadable = str(e)  # not reconstruct a part of it as if it were whole
            _quietly(wfile.flush)
            _quietly(sock.shutdown, socket.SHUT_WR)
        except (OSError, ValueError) as e:  # the server closed first (it says why in its reply)
            reply.unsent = f"{type(e).__name__}: {e}"

    sender = threading.Thread(target=send, name="mrd-client-send", daemon=True)
    sender.start()
    try:
        for obj in ProtocolDeserializer(rfile).deserialize():
            if isinstance(obj, ismrmrd.Image):
                reply.images.append(obj)
            else:
                reply.texts.append(str(obj))
    except TimeoutError:
        raise TimeoutError(f"the MRD server at {host}:{port} sent nothing for {timeout:g} s "
                           f"({len(reply.images)} images so far)") from None
    except (OSError, EOFError, ValueError, struct.error) as e:  # the deserializer's end: CLOSE
        reply.cut = f"{type(e).__name__}: {e}"  # or, as here, a cut or unknown message
    finally:
        if sender.is_alive():  # a server that stopped reading: unblock the sender's write
            _quietly(sock.shutdown, socket.SHUT_RDWR)
        sender.join(timeout)
        for closing in (wfile.close, rfile.close, sock.close):
            _quietly(closing)
    return reply


def _quietly(fn, *args) -> None:
    """``fn(*args)``, where an OSError only means the socket is already gone."""
    try:
        fn(*args)
    except OSError:
        pass
