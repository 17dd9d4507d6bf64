"""DICOM over TLS (output/pacs_tls.py): C-STORE to a pynetdicom SCP that speaks TLS (and asks
for the client's certificate), the queue keeping the TLS settings for a later drain, the batch's
recorded plan, and a protocol's ``pacs.tls`` checked when it loads. Certificates are made for
each test run by the ``openssl`` command."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import ssl
import subprocess
import sys
import warnings
from pathlib import Path

import pydicom
import pytest
from stream_support import storage_scp

from recon_plugin.cli import main
from recon_plugin.config import protocol as P
from recon_plugin.output import pacs, pacs_queue
from recon_plugin.output.delivery import DeliveryPlan
from recon_plugin.output.pacs_tls import TlsSettings, TlsSettingsError
from tests.test_output_pacs import CALLING, ORTHANC, OrthancServer, free_port, write_series

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="needs the openssl command to make test certificates")


@pytest.fixture(autouse=True)
def _collect_leaked_sockets():
    """pynetdicom 3.0.4 loses a failed TLS connection's socket without closing it (its
    ``_shutdown_socket`` skips ``close`` when ``shutdown`` raises on a socket that never
    connected): collected here, where it is known, not as a warning in a later test."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.pem", "-days", "2", "-subj", f"/CN={name}", cwd=d)


def _signed(d: Path, name: str, ca: str, san: str) -> None:
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=d)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA, the PACS's certificate for 127.0.0.1, a client certificate, and another CA."""
    d = tmp_path_factory.mktemp("certs")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _signed(d, "server", "ca", "IP:127.0.0.1")
    _signed(d, "client", "ca", "DNS:recon-plugin.example")
    return d


def _tls_scp(port: int, stored: list, certs: Path, client_cert: bool = True):
    """A storage SCP on 127.0.0.1:``port`` speaking TLS only (asking for the client's
    certificate where ``client_cert``); it keeps the SOP Instance UIDs it stores."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    if client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(certs / "ca.pem")
    return storage_scp(port, stored, "TLS_PACS", ctx)


def _client(certs: Path, **kw) -> TlsSettings:
    return TlsSettings.make(str(certs / "ca.pem"), str(certs / "client.pem"),
                            str(certs / "client.key"), **kw)


def test_c_store_over_tls_and_what_a_wrong_setting_says(certs, tmp_path):
    port = free_port()
    target = f"TLS_PACS@127.0.0.1:{port}"
    paths = write_series(tmp_path / "dcm", nslices=2, seed=21)
    stored: list[str] = []
    scp = _tls_scp(port, stored, certs)
    try:
        res = pacs.send_files(paths, target, timeout=10, tls=_client(certs))
        assert res.ok and len(res.sent) == 2
        assert sorted(stored) == sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in paths)
        stored.clear()
        wrong_ca = TlsSettings.make(str(certs / "other-ca.pem"), str(certs / "client.pem"),
                                    str(certs / "client.key"))
        with pytest.raises(pacs.PacsError, match=r"over TLS .*chain to .*other-ca\.pem and "
                                                 r"name 127\.0\.0\.1"):
            pacs.send_files(paths, target, timeout=10, tls=wrong_ca)
        no_cert = TlsSettings.make(str(certs / "ca.pem"))
        with pytest.raises(pacs.PacsError, match="over TLS"):
            pacs.send_files(paths, target, timeout=10, tls=no_cert)
        with pytest.raises(pacs.PacsError, match="did not answer plain DICOM: it speaks TLS"):
            pacs.send_files(paths, target, timeout=10)  # plain DICOM to a TLS port
        assert stored == []
    finally:
        scp.shutdown()
    missing = TlsSettings.make(str(certs / "nowhere.pem"))
    with pytest.raises(pacs.PacsError, match=r"TLS ca_file .*nowhere\.pem: No such file"):
        pacs.send_files(paths, target, timeout=10, tls=missing)


def test_the_queue_keeps_the_tls_settings_for_its_drain(certs, tmp_path):
    """DICOM queued while the PACS is down goes out over TLS when `send` drains it later: the
    manifest records the settings (a plain retry would never reach a TLS-only PACS)."""
    port = free_port()
    target = f"TLS_PACS@127.0.0.1:{port}"
    queue = tmp_path / "queue"
    paths = write_series(tmp_path / "dcm", nslices=3, seed=22)
    tls = _client(certs)
    plan = DeliveryPlan((target,), "RECON_PLUGIN", queue, tls)
    assert DeliveryPlan.from_state(json.loads(json.dumps(plan.to_state()))) == plan
    report = plan.deliver(paths)
    assert (report.sent, report.queued) == (0, 3)
    (item,) = pacs_queue.queued_items(queue)
    assert TlsSettings.from_dict(item["tls"]) == tls
    stored: list[str] = []
    scp = _tls_scp(port, stored, certs)
    try:
        assert main(["-q", "send", "--queue", str(queue)]) == 0
        assert len(stored) == 3 and pacs_queue.queued_items(queue) == []
    finally:
        scp.shutdown()


def test_a_manifest_with_broken_tls_settings_is_put_aside(tmp_path):
    queue = tmp_path / "queue"
    paths = write_series(tmp_path / "dcm", nslices=1, seed=23)
    item = pacs_queue.enqueue(paths, "NOBODY@127.0.0.1:9", queue, tls=TlsSettings("/x/ca.pem"))
    m = json.loads((item / "manifest.json").read_text())
    m["tls"] = {"ca_file": 5}
    (item / "manifest.json").write_text(json.dumps(m))
    assert pacs_queue.drain(queue, timeout=2) == (0, 0)
    assert len(list((queue / pacs_queue.DEAD_DIR).rglob("*.dcm"))) == 1


@pytest.mark.parametrize("tls, message", [
    ("{ca_file: certs/ca.pem}", "ca_file 'certs/ca.pem' is not an absolute path"),
    ("{ca_file: CERTS/ca.pem, cert_file: CERTS/client.pem}",
     "cert_file and key_file go together"),
    ("{ca_file: CERTS/ca.pem, verify: false}", "verify"),
])
def test_a_protocol_with_unusable_tls_settings_is_refused(certs, tmp_path, tls, message):
    (tmp_path / "site.yaml").write_text(
        "name: site\nextends: default\npacs: {targets: ['PACS@10.0.0.5:2762'], "
        f"tls: {tls.replace('CERTS', str(certs))}}}\n")
    with pytest.raises(P.ProtocolError, match=r"pacs\.tls") as err:
        P.load_protocol("site", [tmp_path])
    assert message.replace("CERTS", str(certs)) in str(err.value)


def test_a_missing_certificate_queues_the_dicom_and_stops_no_reconstruction(certs, tmp_path,
                                                                             caplog):
    """The certificates are read when sending: a protocol whose CA file is gone (rotated,
    mistyped) still loads and reconstructs; its DICOM waits in the queue, the error naming
    the file, and goes out once the file is there."""
    from recon_plugin.sim import simulate_volume
    from recon_plugin.sim.writers import write_ismrmrd

    port = free_port()
    ca = tmp_path / "pki" / "ca.pem"
    (tmp_path / "site.yaml").write_text(
        f"name: site\nextends: default\npacs: {{targets: ['TLS_PACS@127.0.0.1:{port}'], "
        f"tls: {{ca_file: '{ca}', cert_file: '{certs}/client.pem', "
        f"key_file: '{certs}/client.key'}}}}\n")
    vol = simulate_volume("test", "PD", num_slices=1, num_coils=4, matrix=(48, 32), snr=40.0)
    raw = write_ismrmrd(vol, tmp_path / "scan.h5", acceleration=2, calib_lines=16)
    out = tmp_path / "out"
    assert main(["-q", "recon", str(raw), "--out", str(out), "--method", "zero-filled",
                 "--protocol", str(tmp_path / "site.yaml")]) == 1  # DICOM waits in the queue
    assert len(list(out.glob("scan-*/series_*/*.dcm"))) == 1
    assert len(pacs_queue.queued_items(out / ".pacs-queue")) == 1
    assert f"TLS ca_file {ca}: No such file" in caplog.text
    ca.parent.mkdir()
    shutil.copy(certs / "ca.pem", ca)
    stored: list[str] = []
    scp = _tls_scp(port, stored, certs)
    try:
        assert main(["-q", "send", "--queue", str(out / ".pacs-queue")]) == 0
        assert len(stored) == 1
    finally:
        scp.shutdown()


def test_a_protocol_with_tls_makes_a_tls_plan(certs, tmp_path):
    (tmp_path / "site.yaml").write_text(
        "name: site\nextends: default\npacs: {targets: ['PACS@10.0.0.5:2762'], "
        f"tls: {{ca_file: '{certs}/ca.pem', cert_file: '{certs}/client.pem', "
        f"key_file: '{certs}/client.key', check_hostname: false}}}}\n")
    plan = DeliveryPlan.make(P.load_protocol("site", [tmp_path]).pacs, out_dir=tmp_path)
    assert plan.tls == TlsSettings(str(certs / "ca.pem"), str(certs / "client.pem"),
                                   str(certs / "client.key"), False)
    with pytest.raises(TlsSettingsError, match="go together"):
        TlsSettings.make(str(certs / "ca.pem"), key_file=str(certs / "client.key"))


def test_orthanc_over_tls(certs, tmp_path):
    """A real PACS with DICOM TLS on (Orthanc's DicomTls* settings, client certificate
    required) stores what is sent over TLS, and refuses a plain association."""
    if ORTHANC is None:
        pytest.skip("Orthanc not installed (Debian package orthanc)")
    server = OrthancServer(tmp_path / "orthanc", extra={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(certs / "server.pem"),
        "DicomTlsPrivateKey": str(certs / "server.key"),
        "DicomTlsTrustedCertificates": str(certs / "ca.pem"),
        "DicomTlsRemoteCertificateRequired": True,
    })
    try:
        paths = write_series(tmp_path / "dcm", nslices=2, seed=24)
        with pytest.raises(pacs.PacsError):
            pacs.send_files(paths, server.target, CALLING, timeout=10)
        assert server.sop_uids() == set()
        res = pacs.send_files(paths, server.target, CALLING, timeout=10, tls=_client(certs))
        assert res.ok and len(res.sent) == 2
        assert server.sop_uids() == {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    finally:
        server.stop()


def test_only_the_protocols_ca_is_trusted(certs, tmp_path, monkeypatch):
    """The PACS's certificate must chain to ``ca_file`` alone: the context also trusted the
    system's CA store (``ssl.create_default_context`` loads it when given no CA), so any
    certificate a public or site-wide CA issued passed (with ``check_hostname: false``, for
    any host). Here the system store (``SSL_CERT_FILE``) holds the CA that signed the
    PACS's certificate while the protocol names another one: refused."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certs / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))  # no system folder of CAs either
    port = free_port()
    paths = write_series(tmp_path / "dcm", nslices=1, seed=25)
    stored: list[str] = []
    scp = _tls_scp(port, stored, certs, client_cert=False)
    try:
        for check_hostname in (True, False):
            other = TlsSettings.make(str(certs / "other-ca.pem"), check_hostname=check_hostname)
            with pytest.raises(pacs.PacsError, match="over TLS"):
                pacs.send_files(paths, f"TLS_PACS@127.0.0.1:{port}", timeout=10, tls=other)
        assert stored == []
    finally:
        scp.shutdown()
    with pytest.raises(TlsSettingsError, match="ca_file is empty"):  # e.g. an edited manifest
        TlsSettings.from_dict({"ca_file": ""}).context()


def test_inspect_names_a_tls_setting_recon_could_not_use(certs, tmp_path, capsys):
    """recon reads the certificates only when sending: `inspect` is where an administrator
    sees beforehand that they cannot be used."""
    from recon_plugin.sim import simulate_volume
    from recon_plugin.sim.writers import write_ismrmrd

    vol = simulate_volume("test", "PD", num_slices=1, num_coils=4, matrix=(48, 32), snr=40.0)
    raw = write_ismrmrd(vol, tmp_path / "scan.h5", acceleration=2, calib_lines=16)
    for ca, seen in ((certs / "ca.pem", "over TLS\n"), (tmp_path / "gone.pem", "TLS NOT USABLE")):
        (tmp_path / "site.yaml").write_text(
            "name: site\nextends: default\npacs: {targets: ['PACS@10.0.0.5:2762'], "
            f"tls: {{ca_file: '{ca}'}}}}\n")
        assert main(["-q", "inspect", str(raw), "--protocol", str(tmp_path / "site.yaml")]) == 0
        text = capsys.readouterr().out
        assert "PACS PACS@10.0.0.5:2762 over TLS" in text and seen in text
    assert main(["-q", "inspect", str(raw), "--protocol", str(tmp_path / "site.yaml"),
                 "--json"]) == 0
    (d,) = json.loads(capsys.readouterr().out)
    assert d["protocol"]["pacs"]["tls"]["ca_file"] == str(tmp_path / "gone.pem")
    assert "No such file" in d["protocol"]["pacs"]["tls_error"]


def test_echo_a_tls_pacs_with_the_protocols_settings(certs, tmp_path, capsys):
    """`recon-plugin echo --protocol site` verifies the protocol's targets with its calling AE
    title and TLS settings, as a PACS administrator tests a new sender."""
    port = free_port()
    (tmp_path / "site.yaml").write_text(
        f"name: site\nextends: default\npacs: {{targets: ['TLS_PACS@127.0.0.1:{port}'], "
        f"calling_aet: SITE_RECON, tls: {{ca_file: '{certs}/ca.pem', cert_file: "
        f"'{certs}/client.pem', key_file: '{certs}/client.key'}}}}\n")
    proto = ["--protocol", "site", "--protocol-dir", str(tmp_path)]
    scp = _tls_scp(port, [], certs)
    try:
        assert main(["-q", "echo", *proto]) == 0
        assert "answered C-ECHO in" in capsys.readouterr().out
        assert main(["-q", "echo", f"TLS_PACS@127.0.0.1:{port}"]) == 1  # plain: refused
        assert "FAILED: association with" in capsys.readouterr().out
    finally:
        scp.shutdown()
    assert main(["-q", "echo", *proto, "--timeout", "2"]) == 1  # the PACS is gone
    assert "nothing accepts connections" in capsys.readouterr().out


def _pynetdicom_records(caplog) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records
            if r.name.startswith("pynetdicom")]


def test_plain_dicom_to_a_tls_only_pacs_is_one_line_naming_tls(certs, tmp_path, capsys, caplog):
    """`echo` of a TLS-only PACS without a protocol that configures TLS printed pynetdicom's
    ERROR lines and a traceback before its FAILED line, which said only "no DICOM service
    answering": now one line naming the PACS and the cause (it speaks TLS: pacs.tls), with or
    without -q; pynetdicom's own lines only with -v; its socket is closed, not leaked."""
    port = free_port()
    target = f"TLS_PACS@127.0.0.1:{port}"
    scp = _tls_scp(port, [], certs)
    netlog = logging.getLogger("pynetdicom")
    try:
        for flags in (["-q"], []):
            caplog.clear()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always", ResourceWarning)
                assert main([*flags, "echo", target, "--timeout", "5"]) == 1
                gc.collect()
            (line,) = capsys.readouterr().out.splitlines()
            assert line.startswith(f"{target}: FAILED: ")
            assert f"did not answer plain DICOM: it speaks TLS on port {port}" in line
            assert "configure pacs.tls" in line and "--protocol" in line  # echo: how to use it
            assert _pynetdicom_records(caplog) == [] and "Traceback" not in caplog.text
            assert not [w for w in seen if issubclass(w.category, ResourceWarning)]
        run = subprocess.run([sys.executable, "-m", "recon_plugin.cli", "echo", target,
                              "--timeout", "5"], capture_output=True, text=True, timeout=60)
        assert run.returncode == 1 and run.stderr == "", run.stderr
        assert len(run.stdout.splitlines()) == 1 and "pacs.tls" in run.stdout
        caplog.clear()
        assert main(["-v", "echo", target, "--timeout", "5"]) == 1
        assert _pynetdicom_records(caplog)  # -v: pynetdicom's own account too
    finally:
        netlog.setLevel(logging.NOTSET)
        scp.shutdown()
    capsys.readouterr()


def test_recon_send_and_send_queue_to_a_tls_only_pacs_say_why_in_one_line(certs, tmp_path,
                                                                            capsys, caplog):
    """`recon --send` and `send --queue` to a TLS-only PACS without pacs.tls: the DICOM is
    queued with one warning naming the PACS and TLS (pynetdicom's lines and traceback had
    come first; `send` said only "sent 0, still queued 1")."""
    from recon_plugin.sim import simulate_volume
    from recon_plugin.sim.writers import write_ismrmrd

    port = free_port()
    target = f"TLS_PACS@127.0.0.1:{port}"
    vol = simulate_volume("test", "PD", num_slices=1, num_coils=4, matrix=(48, 32), snr=40.0)
    raw = write_ismrmrd(vol, tmp_path / "scan.h5", acceleration=2, calib_lines=16)
    out, queue = tmp_path / "out", tmp_path / "out" / ".pacs-queue"
    scp = _tls_scp(port, [], certs)

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and r.name.startswith("recon_plugin.output.pacs")]

    try:
        assert main(["-q", "recon", str(raw), "--out", str(out), "--method", "zero-filled",
                     "--send", target]) == 1
        (line,) = said()
        assert target in line and "it speaks TLS" in line and "pacs.tls" in line
        assert _pynetdicom_records(caplog) == [] and "Traceback" not in caplog.text
        caplog.clear()
        capsys.readouterr()
        assert main(["-q", "send", "--queue", str(queue)]) == 1
        assert capsys.readouterr().out == "sent 0, still queued 1\n"
        (line,) = said()
        assert target in line and "it speaks TLS" in line and "pacs.tls" in line
        assert "1 file stays queued" in line
        assert _pynetdicom_records(caplog) == []
    finally:
        scp.shutdown()
