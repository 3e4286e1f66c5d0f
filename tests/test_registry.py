"""The model registry: checked registrations, the environment entry, the embedded demo."""

import pytest

from dtrak_core import registry
from dtrak_core.datasets import DatasetError
from dtrak_core.models import ModelError


def test_register_checks_and_lists(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DTRAK_HIDE_DEMO", "1")
    monkeypatch.delenv("DTRAK_MODEL_DIR", raising=False)
    data = tiny_model_dir.parent / "data"
    entry = registry.register_model("tiny-1", tiny_model_dir, data, tmp_path)
    assert [e.name for e in registry.list_models(tmp_path)] == ["tiny-1"]
    assert entry.model_dir == str(tiny_model_dir.resolve())
    registry.register_model("tiny-1", tiny_model_dir, data, tmp_path)  # re-registering replaces
    assert len(registry.list_models(tmp_path)) == 1
    monkeypatch.setenv("DTRAK_MODEL_DIR", str(tiny_model_dir))
    monkeypatch.setenv("DTRAK_MODEL_NAME", "env")
    assert [(e.name, e.source) for e in registry.list_models(tmp_path)] == [("env", "environment"),
                                                                          ("tiny-1", "registered")]


def test_bad_registrations_say_why(tiny_model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="is not a diffusers pipeline folder"):
        registry.register_model("x", tmp_path / "empty", tmp_path, tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        registry.register_model("x", tiny_model_dir, tmp_path / "nope", tmp_path)
    with pytest.raises(ValueError, match="model name '../x' must be"):
        registry.register_model("../x", tiny_model_dir, tmp_path, tmp_path)
    assert not registry.registry_path(tmp_path).exists()


def test_the_embedded_models_are_listed_unless_hidden(tmp_path, monkeypatch):
    from dtrak_core.paths import DEMO_MODEL_DIR, MINI_MODEL_DIR

    monkeypatch.delenv("DTRAK_MODEL_DIR", raising=False)
    monkeypatch.delenv("DTRAK_HIDE_DEMO", raising=False)
    present = [(name, str(folder)) for name, folder in (("emoji3-demo", DEMO_MODEL_DIR), ("emoji3-mini", MINI_MODEL_DIR))
               if (folder / "model_index.json").exists()]
    assert ("emoji3-mini", str(MINI_MODEL_DIR)) in present  # committed with the repository
    assert [(e.name, e.model_dir) for e in registry.list_models(tmp_path)] == present
    assert {e.source for e in registry.list_models(tmp_path)} == {"embedded"}
    monkeypatch.setenv("DTRAK_HIDE_DEMO", "1")
    assert registry.list_models(tmp_path) == []
