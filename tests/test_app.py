"""The entry page, run headless by Streamlit's AppTest against the real dataset folder."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def test_app_shows_dataset_and_licences():
    from dtrak_core.paths import EMOJI3_DIR

    if not (EMOJI3_DIR / "metadata.csv").exists():
        pytest.skip("emoji3 not built (make test builds it)")
    app = AppTest.from_file(APP, default_timeout=120).run()
    assert not app.exception
    assert app.title[0].value.startswith("dtrak")
    assert [s.value for s in app.subheader][0] == "Training data: emoji3"
    text = " ".join(m.value for m in app.markdown)
    assert "CC-BY 4.0" in text and "OFL 1.1" in text


def test_app_reports_a_missing_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr("dtrak_core.paths.EMOJI3_DIR", tmp_path / "missing")
    app = AppTest.from_file(APP, default_timeout=60).run()
    assert not app.exception
    assert "does not exist" in app.error[0].value and "make data" in app.error[0].value
