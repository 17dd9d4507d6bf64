"""A minimal MRD (ISMRMRD streaming) client: send a raw ISMRMRD file to a server, collect images.

It is what a FIRE-style scanner client does (config, header, acquisitions, CLOSE; images back
on the same socket), for tests, benchmarks and for checking a running ``recon-plugin serve``.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import ismrmrd
from ismrmrd.serialization import ConfigFile, ProtocolDeserializer, ProtocolSerializer


def stream_file(
    address: tuple[str, int], raw: Path, config: str = "auto", slice_gap_s: float = 0.0,
    dataset: str = "dataset", timeout: float = 120.0,
) -> tuple[list[ismrmrd.Image], list[str]]:
    """Stream ``raw`` to ``address``; returns (images, text messages) received until CLOSE.

    ``slice_gap_s`` pauses after each ACQ_LAST_IN_SLICE acquisition, as a scanner that spends
    that long acquiring the next slice would.
    """
    with ismrmrd.File(str(raw), "r") as f:
        header, acqs = f[dataset].header, f[dataset].acquisitions[:]
    sock = socket.create_connection(address, timeout=timeout)
    wfile, rfile = sock.makefile("wb"), sock.makefile("rb")

    def send() -> None:
        out = ProtocolSerializer(wfile)
        out.serialize(ConfigFile(config))
        out.serialize(header)
        for acq in acqs:
            out.serialize(acq)
            if slice_gap_s and acq.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
                wfile.flush()
                time.sleep(slice_gap_s)
        out.close()
        wfile.flush()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    images, texts = [], []
    try:
        for obj in ProtocolDeserializer(rfile).deserialize():
            if isinstance(obj, ismrmrd.Image):
                images.append(obj)
            else:
                texts.append(str(obj))
    finally:
        sender.join(timeout)
        wfile.close()
        rfile.close()
        sock.close()
    return images, texts
