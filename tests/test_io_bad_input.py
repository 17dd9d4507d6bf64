"""Bad input: one clear RawDataError naming the file and the problem, and a batch goes on."""

from __future__ import annotations

import h5py
import ismrmrd
import numpy as np
import pytest

from recon_plugin.io import read_raw
from recon_plugin.io.header import parse_header
from recon_plugin.scan import RawDataError
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_fastmri, write_ismrmrd


@pytest.fixture(scope="module")
def vol():
    return simulate_volume(num_slices=2, num_coils=2, matrix=(16, 12), fov_mm=(200.0, 240.0),
                           seed=7)


@pytest.fixture
def fastmri_file(tmp_path, vol):
    return write_fastmri(vol, tmp_path / "good_fastmri.h5", undersample=False)


@pytest.fixture
def ismrmrd_file(tmp_path, vol):
    return write_ismrmrd(vol, tmp_path / "good_ismrmrd.h5")


def _fails(path, *words):
    with pytest.raises(RawDataError) as info:
        read_raw(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


def _replace(f: h5py.File, name: str, data) -> None:
    del f[name]
    f.create_dataset(name, data=data)


def _set_xml(path, xml: str) -> None:
    with h5py.File(path, "a") as f:
        del f["dataset/xml"]
        d = f["dataset"].create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        d[0] = xml.encode()


def test_missing_empty_and_not_hdf5(tmp_path):
    _fails(tmp_path / "nope.h5", "not found")
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    _fails(empty, "empty")
    text = tmp_path / "notes.h5"
    text.write_text("this is not a raw data file\n" * 20)
    _fails(text, "not an hdf5")


def test_truncated_files(fastmri_file, ismrmrd_file):
    for path in (fastmri_file, ismrmrd_file):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        _fails(path, "truncated")


def test_fastmri_missing_kspace_or_header(fastmri_file):
    with h5py.File(fastmri_file, "a") as f:
        del f["kspace"]
    _fails(fastmri_file, "kspace")


def test_fastmri_missing_header(fastmri_file):
    with h5py.File(fastmri_file, "a") as f:
        del f["ismrmrd_header"]
    _fails(fastmri_file, "ismrmrd_header", "missing")


def test_fastmri_inconsistent_shapes(fastmri_file):
    with h5py.File(fastmri_file, "a") as f:
        k = f["kspace"][()]
        _replace(f, "kspace", k[0, 0])  # 2D
    _fails(fastmri_file, "shape")


def test_fastmri_real_kspace(fastmri_file):
    with h5py.File(fastmri_file, "a") as f:
        _replace(f, "kspace", np.abs(f["kspace"][()]).astype(np.float32))
    _fails(fastmri_file, "complex")


def test_fastmri_mask_length(fastmri_file):
    with h5py.File(fastmri_file, "a") as f:
        f.create_dataset("mask", data=np.ones(5, bool))
    _fails(fastmri_file, "mask")


def test_fastmri_nan(fastmri_file):
    with h5py.File(fastmri_file, "a") as f:
        k = f["kspace"][()]
        k[1, 0, 3, 4] = np.nan
        f["kspace"][...] = k
    _fails(fastmri_file, "nan", "slice 1")


def test_a_file_of_zeros_is_refused_one_zero_slice_is_not(fastmri_file):
    with h5py.File(fastmri_file, "a") as f:
        k = f["kspace"][()]
        f.create_dataset("mask", data=np.ones(k.shape[-1], bool))  # the lines say "measured"
        k[0] = 0
        f["kspace"][...] = k
    assert read_raw(fastmri_file).slices  # one silent slice: the others still carry signal
    with h5py.File(fastmri_file, "a") as f:
        f["kspace"][...] = np.zeros_like(k)
    _fails(fastmri_file, "every k-space sample is zero")


def test_fastmri_bad_header_xml(fastmri_file):
    with h5py.File(fastmri_file, "a") as f:
        _replace(f, "ismrmrd_header", np.bytes_(b"<ismrmrdHeader><encoding><oops"))
    _fails(fastmri_file, "header")


def test_unknown_layout(tmp_path):
    path = tmp_path / "weird.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 4, 4)))
        f.create_group("stuff")
    _fails(path, "unknown", "images")


def test_ismrmrd_without_header_or_data(ismrmrd_file):
    with h5py.File(ismrmrd_file, "a") as f:
        del f["dataset/xml"]
    _fails(ismrmrd_file, "xml")


def test_ismrmrd_without_acquisitions(ismrmrd_file):
    with h5py.File(ismrmrd_file, "a") as f:
        del f["dataset/data"]
    _fails(ismrmrd_file, "acquisitions")


def test_ismrmrd_only_noise(tmp_path, vol):
    path = tmp_path / "noise_only.h5"
    with ismrmrd.File(str(ismrmrd_path := write_ismrmrd(vol, tmp_path / "x.h5")), "r") as f:
        xml = f["dataset"]._contents["xml"][0]
        acqs = list(f["dataset"].acquisitions)[:1]
    assert acqs[0].is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) and ismrmrd_path.exists()
    with ismrmrd.File(str(path), "w") as f:
        f["dataset"].header = ismrmrd.xsd.CreateFromDocument(xml)
        f["dataset"].acquisitions = acqs
    # a dependent noise measurement, not a damaged scan: the batch passes it over
    _fails(path, "noise measurement only", "nothing to reconstruct")


def test_ismrmrd_nan_sample(ismrmrd_file):
    with h5py.File(ismrmrd_file, "a") as f:
        d = f["dataset/data"]
        row = d[5]
        row["data"][0] = np.nan
        d[5] = row
    _fails(ismrmrd_file, "nan")



def test_messages_that_name_the_problem(tmp_path, fastmri_file, ismrmrd_file, vol):
    """Found by fuzzing: a header that is not text had been called 'empty' or had given
    'sequence item 0: expected a bytes-like object', an acquisition without samples 'discards
    0+0 of 0 samples', a data table that is not acquisition records 'unexpected IndexError'."""
    import shutil

    xml_int = shutil.copy(ismrmrd_file, tmp_path / "xml_int.h5")
    with h5py.File(xml_int, "a") as f:
        _replace(f, "dataset/xml", np.arange(5))
    _fails(xml_int, "ISMRMRD XML header is not text but int64 '0'")  # its first element
    with h5py.File(fastmri_file, "a") as f:
        _replace(f, "ismrmrd_header", np.arange(4))
    _fails(fastmri_file, "ISMRMRD XML header is not text but an array of int64 (4,)")
    table = shutil.copy(ismrmrd_file, tmp_path / "table.h5")
    with h5py.File(table, "a") as f:
        _replace(f, "dataset/data", np.zeros((41, 10), np.float32))
    _fails(table, "acquisitions 0..", "not ISMRMRD acquisition records")
    with ismrmrd.File(str(ismrmrd_file), "r") as f:
        xml = f["dataset"]._contents["xml"][0]
        acqs = list(f["dataset"].acquisitions)
    head = ismrmrd.AcquisitionHeader.from_buffer_copy(acqs[7].getHead())
    head.number_of_samples = 0
    acqs[7] = ismrmrd.Acquisition(head)
    empty = tmp_path / "no_samples.h5"
    with ismrmrd.File(str(empty), "w") as f:
        f["dataset"].header = ismrmrd.xsd.CreateFromDocument(xml)
        f["dataset"].acquisitions = acqs
    _fails(empty, f"acquisition {acqs[7].scan_counter} has no samples")
    # a centre past the samples had been clamped to the last one without a word (helper fuzz:
    # the images changed by 76 % of their maximum)
    with ismrmrd.File(str(ismrmrd_file), "r") as f:
        acqs = list(f["dataset"].acquisitions)
    head = ismrmrd.AcquisitionHeader.from_buffer_copy(acqs[9].getHead())
    head.center_sample = 60000
    acqs[9] = ismrmrd.Acquisition(head, acqs[9].data)
    off_centre = tmp_path / "centre.h5"
    with ismrmrd.File(str(off_centre), "w") as f:
        f["dataset"].header = ismrmrd.xsd.CreateFromDocument(xml)
        f["dataset"].acquisitions = acqs
    _fails(off_centre, f"acquisition {acqs[9].scan_counter} puts k-space centre at sample 60000 "
           f"of its {acqs[9].number_of_samples} (center_sample)")

def test_ismrmrd_header_missing_encoded_space(ismrmrd_file):
    with h5py.File(ismrmrd_file, "r") as f:
        xml = f["dataset/xml"][0].decode()
    start, stop = xml.index("<encodedSpace>"), xml.index("</encodedSpace>")
    _set_xml(ismrmrd_file, xml[:start] + xml[stop + len("</encodedSpace>") :])
    _fails(ismrmrd_file, "encoding[0].encodedSpace")


def test_ismrmrd_non_cartesian_and_3d(ismrmrd_file):
    with h5py.File(ismrmrd_file, "r") as f:
        xml = f["dataset/xml"][0].decode()
    _set_xml(ismrmrd_file, xml.replace("<trajectory>cartesian", "<trajectory>radial"))
    _fails(ismrmrd_file, "radial")
    # a header that says 3D (encoded z = 8) over 2D data: every line on one partition encode
    z = xml.index("<z>1</z>")
    _set_xml(ismrmrd_file, xml[:z] + "<z>8</z>" + xml[z + 8 :])
    _fails(ismrmrd_file, "3D", "kz", "encoded matrix z")


def test_ismrmrd_coil_count_changes(tmp_path, ismrmrd_file):
    with ismrmrd.File(str(ismrmrd_file), "r") as f:
        xml = f["dataset"]._contents["xml"][0]
        acqs = list(f["dataset"].acquisitions)
    bad = acqs[6]
    acqs[6] = ismrmrd.Acquisition.from_array(np.zeros((3, bad.number_of_samples), np.complex64),
                                             idx=bad.idx, center_sample=bad.center_sample)
    path = tmp_path / "coils.h5"
    with ismrmrd.File(str(path), "w") as f:
        f["dataset"].header = ismrmrd.xsd.CreateFromDocument(xml)
        f["dataset"].acquisitions = acqs
    _fails(path, "coils")


def test_ismrmrd_readout_length_changes(tmp_path, ismrmrd_file, caplog):
    """A line with more samples than the scan's others (read as 2x readout oversampling: its
    samples on another k-space grid) is refused, naming both lines; a shorter one is placed
    by its centre with a warning. The longer one had been taken with an INFO line, and
    changed the slice's image by a quarter of its maximum."""
    with ismrmrd.File(str(ismrmrd_file), "r") as f:
        xml = f["dataset"]._contents["xml"][0]
        acqs = list(f["dataset"].acquisitions)
    imaging = [i for i, a in enumerate(acqs) if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    n = acqs[imaging[0]].number_of_samples
    i = imaging[2]  # an imaging line after the first
    for samples, name in ((2 * n, "long.h5"), (n - 4, "short.h5")):
        bad = acqs[i]
        changed = list(acqs)
        changed[i] = ismrmrd.Acquisition.from_array(
            np.resize(bad.data, (bad.active_channels, samples)).astype(np.complex64),
            idx=bad.idx, center_sample=bad.center_sample, scan_counter=bad.scan_counter,
            flags=bad.flags, position=bad.position, read_dir=bad.read_dir,
            phase_dir=bad.phase_dir, slice_dir=bad.slice_dir)
        path = tmp_path / name
        with ismrmrd.File(str(path), "w") as f:
            f["dataset"].header = ismrmrd.xsd.CreateFromDocument(xml)
            f["dataset"].acquisitions = changed
        if samples > n:
            _fails(path, f"carries {samples} readout samples", f"carried {n}",
                   "must not change")
        else:
            assert len(read_raw(path).slices) == 2
            assert f"carries {samples} readout samples where" in caplog.text


def test_header_missing_optional_fields_does_not_crash():
    xml = """<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>
      <encodedSpace><matrixSize><x>64</x><y>32</y><z>1</z></matrixSize>
        <fieldOfView_mm><x>200</x><y>100</y><z>5</z></fieldOfView_mm></encodedSpace>
      <reconSpace><matrixSize><x>64</x><y>32</y><z>1</z></matrixSize>
        <fieldOfView_mm><x>200</x><y>100</y><z>5</z></fieldOfView_mm></reconSpace>
      <encodingLimits/><trajectory>cartesian</trajectory><vendorThing>1</vendorThing>
    </encoding></ismrmrdHeader>"""
    warnings: list[str] = []
    h = parse_header(xml, "minimal.h5", warnings)
    assert h.encoded_matrix == (64, 32, 1) and h.num_coils == 0
    assert h.sequence.tr_ms is None and h.identity.patient_name == ""
    assert h.acceleration is None and h.protocol_name == ""
    assert warnings and "minimal.h5" in warnings[0]
    with pytest.raises(RawDataError, match="reconSpace"):
        parse_header(xml.replace("reconSpace", "reconSpaceX"), "minimal.h5")
    with pytest.raises(RawDataError, match="matrixSize.x"):
        parse_header(xml.replace("<x>64</x>", "<x>abc</x>", 1), "minimal.h5")


def test_batch_goes_on(tmp_path, fastmri_file, ismrmrd_file):
    """A file that is not raw data fails alone, named; the batch reconstructs the others."""
    from recon_plugin.batch import run_batch

    junk = tmp_path / "junk.h5"
    junk.write_text("garbage")
    results = run_batch([fastmri_file, junk, ismrmrd_file], tmp_path / "out",
                        overrides={"method": "zero-filled"}, progress=False)
    assert [r.ok for r in results] == [True, False, True], results
    assert "not a readable HDF5 file" in results[1].error or "HDF5" in results[1].error, results[1]


def test_noise_scan_from_another_coil_setup_fails_that_file_clearly(tmp_path, ismrmrd_file):
    from recon_plugin.batch import run_batch

    with ismrmrd.File(str(ismrmrd_file), "r") as f:
        xml = f["dataset"]._contents["xml"][0]
        acqs = list(f["dataset"].acquisitions)
    noise = acqs[0]
    assert noise.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    acqs[0] = ismrmrd.Acquisition.from_array(np.ones((3, noise.number_of_samples), np.complex64),
                                             idx=noise.idx, center_sample=noise.center_sample)
    acqs[0].set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    path = tmp_path / "noise3.h5"
    with ismrmrd.File(str(path), "w") as f:
        f["dataset"].header = ismrmrd.xsd.CreateFromDocument(xml)
        f["dataset"].acquisitions = acqs
    (res,) = run_batch([path], tmp_path / "out", None, progress=False)
    assert not res.ok and "noise scan has 3 coils but the imaging data has 2" in res.error
    assert not list((tmp_path / "out").rglob("*.dcm"))


def test_fastmri_2d_mask_refused_partial_echo_read(fastmri_file):
    """Zeros scattered inside the acquired lines (a 2D mask) are refused with the reason;
    zeros at the same readout positions of every line (partial echo) are not sampling."""
    with h5py.File(fastmri_file, "a") as f:
        k = f["kspace"][()]  # (slices, coils, readout, phase)
        echo = k.copy()
        echo[:, :, :3, :] = 0
        f["kspace"][...] = echo
    scan = read_raw(fastmri_file)
    assert all(s.mask.all() for s in scan.slices)
    rng = np.random.default_rng(0)
    with h5py.File(fastmri_file, "a") as f:
        f["kspace"][...] = k * (rng.random(k.shape[2:]) < 0.4)  # Poisson-like 2D sampling
    _fails(fastmri_file, "kspace slice 0", "2D mask", "readout")


def test_fastmri_kspace_stored_without_the_centring_shift(fastmri_file):
    """k-space stored as numpy's fft2 gives it (centre in the corners) is refused with the
    remedy, instead of an image with its quadrants swapped."""
    with h5py.File(fastmri_file, "a") as f:
        k = f["kspace"][()]
        f["kspace"][...] = np.fft.ifftshift(k, axes=(-2, -1))
    _fails(fastmri_file, "kspace slice 0", "centring shift")


def test_a_refused_size_reads_apart_from_the_limit_and_says_what_would_take_it():
    """A file 0.4 % above the limit read "needs 8.0 GB ..., more than the memory limit of
    8.0 GB": the sizes get the decimals that tell them apart, and the message names the
    --max-memory-gb value that would take the file."""
    from recon_plugin.io.budget import check_budget

    gib = 1 << 30
    with pytest.raises(RawDataError) as e:
        check_budget("big.h5", "the header's k-space", int(8.03 * gib), 8 * gib)
    msg = str(e.value)
    assert "needs 8.03 GB" in msg and "limit of 8.00 GB" in msg
    assert "--max-memory-gb 8.1" in msg and "at least" in msg
    check_budget("big.h5", "the header's k-space", 8 * gib, 8 * gib)  # at the limit: taken


@pytest.mark.parametrize("nbytes, limit, least", [
    (6_000_000, 5_000_000, "0.0056"),  # 5.59 MB: not 0.1 GB, 17 times what it needs
    (int(0.0123 * (1 << 30)), 1 << 20, "0.013"),
    (int(0.25 * (1 << 30)) + 1, 1 << 20, "0.26"),
    (int(8.03 * (1 << 30)), 8 << 30, "8.1"),
    (int(123.41 * (1 << 30)), 8 << 30, "123.5"),  # a tenth of a GB at most above what it needs
    (1000, 100, "0.00000094"),  # 1000 bytes: a plain number, not 9.4e-07
])
def test_the_least_limit_a_refusal_names_is_enough_and_close(nbytes, limit, least):
    """The refusal named the least --max-memory-gb rounded up to a tenth of a GB: "0.1 at least"
    for a file that needs 0.0056. Now two significant figures (a tenth at most above 1 GB),
    rounded up: a limit that takes the file, and close to what it needs."""
    from recon_plugin.io.budget import ENV_VAR, check_budget, gb_to_bytes

    with pytest.raises(RawDataError) as e:
        check_budget("f.h5", "the header's k-space", nbytes, limit)
    msg = str(e.value)
    assert f"it needs --max-memory-gb {least} or ${ENV_VAR}={least} at least" in msg
    assert gb_to_bytes(float(least)) >= nbytes  # enough: the file is taken with it
    check_budget("f.h5", "the header's k-space", nbytes, gb_to_bytes(float(least)))
    assert "refused before reading" in msg and "needs " in msg and "memory limit of" in msg


@pytest.mark.parametrize("given, kept", [("02.01.1970", "02.01.1970"),
                                         ("2024-03-04+01:00", "20240304"),
                                         ("1970-01-02", "19700102")])
def test_a_header_date_reaches_the_dicom_writer_whole(given, kept):
    """A date that is not xs:date had been cut to 8 characters before the DICOM writer checked
    it, so its warning named ``02.01.19`` for ``02.01.1970``; one with a time zone keeps
    its date."""
    from recon_plugin.output.dicom_values import da_value
    from recon_plugin.scan import Identity
    from recon_plugin.sim.header import build_header_xml

    xml = build_header_xml((32, 32), (200.0, 200.0), 5.0, 4,
                           identity=Identity(patient_birth_date="1970-01-02"))
    header = parse_header(xml.replace("1970-01-02", given), "t", [])
    assert header.identity.patient_birth_date == kept
    assert da_value(kept) == (kept if kept.isdigit() else "")


def _set_fastmri_xml(path, edit) -> None:
    """Replace the fastMRI file's ``ismrmrd_header`` by ``edit(xml)``."""
    with h5py.File(path, "a") as f:
        xml = f["ismrmrd_header"][()].decode()
        _replace(f, "ismrmrd_header", np.bytes_(edit(xml).encode()))


def test_fastmri_kspace_in_extreme_units_is_not_called_uncentred(fastmri_file):
    """k-space scaled to ~1e30 had overflowed the centring check's float32 squares (a raw
    'RuntimeWarning: overflow encountered in square') and been refused as 'stored without the
    centring shift'; the reader now leaves it to the magnitude check, which names the units."""
    import warnings

    from recon_plugin.recon.preprocess import check_magnitudes

    with h5py.File(fastmri_file, "a") as f:
        k = f["kspace"][()]
        f["kspace"][...] = (k * np.float32(1e30 / np.abs(k).max())).astype(np.complex64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        scan = read_raw(fastmri_file)
    with pytest.raises(RawDataError, match="stored in extreme units"):
        check_magnitudes(scan.slices[0].kspace)


@pytest.mark.parametrize("fmt", ["fastmri", "ismrmrd"])
def test_non_finite_or_negative_sequence_parameters_are_left_out(fmt, fastmri_file,
                                                                 ismrmrd_file):
    """A NaN TE, Inf flip angle, NaN field strength or negative TR in the header had been read
    as given ('TE nan ms'), and the DICOM write failed after the whole reconstruction naming
    no field ('Cannot encode non-finite floats'; a negative TR was written). Each is left out
    with a warning naming the field and its value; a TI of 0 stays."""
    def edit(xml: str) -> str:
        for old, new in (("<TE>100.0</TE>", "<TE>NaN</TE>"), ("<TR>4000.0</TR>", "<TR>-4000</TR>"),
                         ("<flipAngle_deg>90.0", "<TI>0</TI><flipAngle_deg>INF"),
                         ("<systemFieldStrength_T>3.0", "<systemFieldStrength_T>NaN")):
            assert old in xml
            xml = xml.replace(old, new)
        return xml

    if fmt == "fastmri":
        path = fastmri_file
        _set_fastmri_xml(path, edit)
    else:
        path = ismrmrd_file
        with h5py.File(path, "r") as f:
            xml = f["dataset/xml"][0].decode()
        _set_xml(path, edit(xml))
    scan = read_raw(path)
    seq = scan.header.sequence
    assert (seq.te_ms, seq.tr_ms, seq.flip_deg, seq.te_list_ms) == (None, None, None, ())
    assert seq.ti_ms == 0.0
    assert seq.field_strength_t == pytest.approx(3.0, abs=1e-3)  # from H1resonanceFrequency
    said = "\n".join(scan.warnings)
    for words in ("sequenceParameters.TE is nan", "sequenceParameters.TR is -4000.0",
                  "sequenceParameters.flipAngle_deg is inf",
                  "acquisitionSystemInformation.systemFieldStrength_T is nan"):
        assert f"{path}: header field {words}" in said, said


@pytest.mark.parametrize("given", [np.inf, np.nan, -4.0, 0, 1e9, "four"])
def test_fastmri_acceleration_attribute_that_is_no_acceleration_is_ignored(tmp_path, vol,
                                                                             given):
    """An 'acceleration' attribute of inf, NaN, -4, 0 or 1e9 had been used as given: the
    protocol match fell back silently and the DICOM said 'acceleration=infx'. It is ignored
    with a warning naming it, and the acceleration measured from the mask is used."""
    path = write_fastmri(vol, tmp_path / "accel.h5")
    with h5py.File(path, "a") as f:
        del f.attrs["acceleration"]
    measured = read_raw(path).header
    assert measured.acceleration and measured.acceleration_source.startswith("measured")
    with h5py.File(path, "a") as f:
        f.attrs["acceleration"] = given
    scan = read_raw(path)
    assert scan.header.acceleration == measured.acceleration
    assert scan.header.acceleration_source == measured.acceleration_source
    assert any(f"attribute 'acceleration' is {given!r}" in w and "ignored" in w
               for w in scan.warnings), scan.warnings
    with h5py.File(path, "a") as f:
        f.attrs["acceleration"] = 4.0  # a plausible one is taken as given
    assert read_raw(path).header.acceleration == 4.0


def test_attributes_and_groups_that_are_not_what_the_layout_says(tmp_path, fastmri_file,
                                                                 ismrmrd_file):
    """An array attribute had given 'The truth value of an array ... is ambiguous', an ISMRMRD
    'data' group "'Group' object has no attribute 'size'", a fastMRI header group 'Accessing a
    group is done with bytes or str, not <class 'tuple'>': each names the file, the entry and
    what was expected. A fastMRI header declaring a radial trajectory had been reconstructed
    as Cartesian; it is refused as the ISMRMRD reader refuses it."""
    import shutil

    for name, value, expected in (("num_low_frequency", [1, 2], "not a number of lines"),
                                  ("patient_id", ["a", "b", "c"], "not text")):
        path = shutil.copy(fastmri_file, tmp_path / f"{name}.h5")
        with h5py.File(path, "a") as f:
            f.attrs[name] = value
        _fails(path, f"attribute '{name}' is an array of shape ({len(value)},)", expected)
    with h5py.File(fastmri_file, "a") as f:
        f.attrs["num_low_frequency"] = np.nan
    _fails(fastmri_file, "attribute 'num_low_frequency' is nan", "whole number of lines")
    with h5py.File(fastmri_file, "a") as f:
        f.attrs["num_low_frequency"] = 2
        del f["ismrmrd_header"]
        f.create_group("ismrmrd_header")
    _fails(fastmri_file, "'ismrmrd_header' is an HDF5 group", "ISMRMRD XML header")
    with h5py.File(ismrmrd_file, "a") as f:
        del f["dataset/data"]
        f.create_group("dataset/data")
    _fails(ismrmrd_file, "'dataset/data' is an HDF5 group", "ISMRMRD acquisition records")
    radial = write_fastmri(simulate_volume(num_slices=1, num_coils=2, matrix=(16, 12), seed=3),
                           tmp_path / "radial.h5", undersample=False)
    _set_fastmri_xml(radial, lambda x: x.replace("<trajectory>cartesian", "<trajectory>radial"))
    _fails(radial, "trajectory 'radial' is not supported", "Cartesian only")
