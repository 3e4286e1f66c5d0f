"""The evaluation's units on disk: checksummed records, stale temporary files, up-front space checks."""

from __future__ import annotations

import json
import tempfile
import types
from pathlib import Path

import pytest

from dtrak_core.evaluation.units import (RECORD_CHECKSUM, CorruptUnitError, canonical_json, check_file,
                                         clear_stale_temps, read_record, write_file, write_record)
from dtrak_core.io import OutputError, format_bytes, sha256_json
from tests.conftest import write_image_folder

REDO = "run it again"


def test_a_record_round_trips_with_the_checksum_of_its_content(tmp_path):
    path = tmp_path / "unit.json"
    record = {"losses": [0.25, float("nan")], "job": "report-000-s0"}
    written = write_record(path, record, "test.point")
    assert written == {**record, RECORD_CHECKSUM: sha256_json(record)}
    assert path.read_bytes() == canonical_json(written)
    assert json.dumps(read_record(path, REDO), sort_keys=True) == json.dumps(written, sort_keys=True)  # NaN too
    assert read_record(tmp_path / "missing.json", REDO) is None
    assert not list(tmp_path.glob(".*"))  # nothing temporary left


def _replace_at(data: bytes, marker: bytes, new: bytes) -> bytes:
    """``data`` with the bytes right after ``marker`` overwritten by ``new`` (same size)."""
    i = data.index(marker) + len(marker)
    return data[:i] + new + data[i + len(new):]


def test_any_changed_byte_of_a_record_is_caught(tmp_path):
    path = tmp_path / "unit.json"
    write_record(path, {"losses": [0.125, 0.5], "seed": 3}, "test.point")
    good = path.read_bytes()
    message = f"{path} does not match its checksum (changed after it was written); {REDO}"
    checksum_char = good[good.index(b'"record_sha256": "') + 18:][:1]
    for changed in [good.replace(b"0.125", b"0.126"),                       # a value
                    good.replace(b'\n  "seed"', b' \n "seed"'),            # a space moved: same content
                    _replace_at(good, b'"record_sha256": "', b"0" if checksum_char != b"0" else b"1")]:
        assert changed != good and len(changed) == len(good)
        path.write_bytes(changed)
        with pytest.raises(CorruptUnitError) as error:
            read_record(path, REDO)
        assert str(error.value) == message
    path.write_bytes(good[:-20])
    with pytest.raises(CorruptUnitError, match=f"{path} is not valid JSON .*; {REDO}"):
        read_record(path, REDO)


def test_a_record_from_before_checksums_is_read_as_it_is_but_must_be_canonical(tmp_path):
    path = tmp_path / "legacy.json"
    legacy = {"losses": [0.5], "job": "full"}
    path.write_bytes(canonical_json(legacy))
    assert read_record(path, REDO) == legacy
    path.write_text(json.dumps(legacy))  # not the format our writers use: not ours, or changed
    with pytest.raises(CorruptUnitError, match="does not match its checksum"):
        read_record(path, REDO)


def test_a_data_file_is_checked_against_its_records_checksum(tmp_path):
    path = tmp_path / "images.bin"
    digest = write_file(path, lambda tmp: tmp.write_bytes(b"\x00\x01\x02"), "test.point")
    check_file(path, digest, REDO)
    check_file(path, None, REDO)  # a record from before checksums: nothing to check against
    path.write_bytes(b"\x00\x01\x03")
    with pytest.raises(CorruptUnitError, match=f"{path} does not match its checksum"):
        check_file(path, digest, REDO)
    path.unlink()
    with pytest.raises(CorruptUnitError, match=f"{path} is missing although its record lists it; {REDO}"):
        check_file(path, digest, REDO)


def test_stale_temporary_files_of_one_unit_are_cleared_and_no_others(tmp_path):
    unit, other = tmp_path / "report-001-s0.json", tmp_path / "report-001-s1.json"
    # The names atomic_path gives its temporary files, as a SIGKILL leaves them.
    stale = [Path(tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=tmp_path)[1])
             for target in (unit, unit, other)]
    unit.write_text("{}")
    clear_stale_temps(unit)
    assert sorted(tmp_path.iterdir()) == sorted([unit, stale[2]])
    assert unit.read_text() == "{}"


def _little_space(monkeypatch, free: int) -> None:
    """Every file system reports ``free`` bytes free."""
    monkeypatch.setattr("dtrak_core.io.shutil.disk_usage", lambda path: types.SimpleNamespace(free=free))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from dtrak_core.training import TrainConfig, train

    root = tmp_path_factory.mktemp("units")
    data = write_image_folder(root / "data", n=12, size=16)
    return train(TrainConfig(data_dir=str(data), out_dir=str(root / "model"), preset="tiny", image_size=16, steps=4,
                             batch_size=4, warmup_steps=2, checkpoint_every=2), progress=False)


def test_an_lds_build_without_room_for_its_models_stops_before_training(small_model, tmp_path, monkeypatch, capsys):
    import dtrak_core.training as training
    from dtrak_core.cli import main
    from dtrak_core.evaluation.retrain import retrain_bytes

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("no model may be trained"))
    _little_space(monkeypatch, 200_000)
    out = tmp_path / "build"
    assert main(["lds", "build", "--model", str(small_model), "--out", str(out), "--subsets", "2",
                 "--tuning-subsets", "0", "--seeds", "1", "--measure-timesteps", "2", "--generated-seeds", "0",
                 "--no-progress"]) == 2
    need = retrain_bytes(small_model)
    assert need > 200_000
    assert capsys.readouterr().err == (f"error: not enough free space for the LDS retrained models in {out / 'runs'}: "
                                       f"needs {format_bytes(need)}, {format_bytes(200_000)} free\n")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=f"cannot write the LDS build to {tmp_path / 'file'}: .* is not a folder"):
        from dtrak_core.evaluation.lds.build import build_lds
        from dtrak_core.evaluation.lds.config import LdsBuildConfig

        build_lds(LdsBuildConfig(str(small_model), str(tmp_path / "file")), progress=False)


def test_a_counterfactual_batch_without_room_for_its_retrains_stops_before_the_first(small_model, tmp_path,
                                                                                     monkeypatch, capsys):
    import dtrak_core.training as training
    from dtrak_core.cli import main
    from dtrak_core.evaluation.retrain import retrain_bytes

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("no model may be trained"))
    need = 2 * retrain_bytes(small_model)
    _little_space(monkeypatch, need - 1)
    models = tmp_path / "models"
    assert main(["counterfactual", "--model", str(small_model), "--target-seed", "0-1", "--method", "random",
                 "--results", str(tmp_path / "results"), "--models-dir", str(models), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: not enough free space for the counterfactual retrained models in "
                                       f"{models}: needs {format_bytes(need)}, {format_bytes(need - 1)} free\n")
    assert not (tmp_path / "results").exists() and not models.exists()
