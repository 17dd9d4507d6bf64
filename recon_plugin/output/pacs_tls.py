"""DICOM over TLS (the DICOM standard's secure transport profile, PS3.15 B.1; IHE ATNA) for
C-STORE to a PACS: which certificates an association uses, and the client ``ssl`` context.

A protocol's ``pacs.tls`` section (``ca_file``, optional ``cert_file`` + ``key_file`` for a PACS
that asks the client for its certificate, ``check_hostname``) becomes a :class:`TlsSettings`;
the queue records it with each item, so a later ``recon-plugin send`` delivers over TLS too.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import asdict, dataclass, fields
from pathlib import Path


class TlsSettingsError(ValueError):
    """TLS settings that cannot be used; the message names the file or key."""


@dataclass(frozen=True)
class TlsSettings:
    """Certificates of a TLS association (PEM files; absolute paths where they come from a
    protocol).

    ca_file:        the CA certificate(s) the PACS's certificate must chain to;
    cert_file:      this client's certificate, for a PACS that asks for one (with key_file);
    key_file:       its private key (unencrypted PEM);
    check_hostname: the PACS's certificate must name the host the target names.
    """

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    check_hostname: bool = True

    @classmethod
    def make(cls, ca_file: str, cert_file: str | None = None, key_file: str | None = None,
             check_hostname: bool = True) -> TlsSettings:
        """Settings with ``~`` expanded in each path (a protocol's ``pacs.tls`` admits absolute
        paths only: ``config.schema.TlsSpec``); :class:`TlsSettingsError` when only one of
        cert / key is given."""
        if (cert_file is None) != (key_file is None):
            raise TlsSettingsError("cert_file and key_file go together (a client certificate "
                                   "and its key), or neither is given")

        def expanded(p: str | None) -> str | None:
            return None if p is None else str(Path(p).expanduser())

        return cls(expanded(ca_file), expanded(cert_file), expanded(key_file),  # type: ignore[arg-type]
                   bool(check_hostname))

    def context(self) -> ssl.SSLContext:
        """The client context (TLS 1.2 or later, the PACS's certificate verified against
        ``ca_file`` alone: given a CA, ``create_default_context`` does not load the system's
        store); :class:`TlsSettingsError` naming the file that cannot be used."""
        if not self.ca_file:  # "" would make create_default_context trust the system's store
            raise TlsSettingsError("TLS ca_file is empty: name the CA the PACS's certificate "
                                   "chains to")
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSettingsError(f"TLS ca_file {self.ca_file}: {_why(exc)}") from exc
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.check_hostname  # verify_mode stays CERT_REQUIRED
        if self.cert_file:
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise TlsSettingsError(f"TLS cert_file {self.cert_file} / key_file "
                                       f"{self.key_file}: {_why(exc)}") from exc
        return ctx

    def to_dict(self) -> dict:
        """JSON form (queue manifests, the batch's recorded delivery plan)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> TlsSettings | None:
        """The settings :meth:`to_dict` wrote (None for None); TlsSettingsError naming what is
        not such a form."""
        if d is None:
            return None
        if not isinstance(d, dict) or not isinstance(d.get("ca_file"), str):
            raise TlsSettingsError(f"'tls' is {str(d)[:60]!r}, not TLS settings with a ca_file")
        extra = set(d) - {f.name for f in fields(cls)}
        if extra:
            raise TlsSettingsError(f"'tls' has unknown keys {sorted(extra)}")
        for k in ("cert_file", "key_file"):
            if d.get(k) is not None and not isinstance(d[k], str):
                raise TlsSettingsError(f"'tls.{k}' is {d[k]!r}, not a path")
        if not isinstance(d.get("check_hostname", True), bool):
            raise TlsSettingsError(f"'tls.check_hostname' is {d['check_hostname']!r}, not true "
                                   "or false")
        return cls(d["ca_file"], d.get("cert_file"), d.get("key_file"),
                   d.get("check_hostname", True))


def speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether what listens at ``host:port`` answers a TLS handshake: asked only to tell why a
    plain DICOM association failed there (a TLS-only PACS closes it without a word). Nothing is
    verified or sent past the handshake; a TLS alert from the server (e.g. that it wants a
    client certificate) also counts as TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw):
            return True
    except ssl.SSLError as exc:  # a TLS alert is an answer in TLS; a wrong version one is not
        return "ALERT" in str(getattr(exc, "reason", None) or "")
    except OSError:
        return False


def _why(exc: BaseException) -> str:
    """An OS or SSL error as one short phrase (``No such file or directory``)."""
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
