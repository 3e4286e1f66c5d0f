"""The model registry: checked registrations under allowed roots, no silent overwrite, the
environment entry, the embedded models."""

import json
import os

import pytest

from dtrak_core import paths, registry
from dtrak_core.datasets import DatasetError
from dtrak_core.models import ModelError
from dtrak_core.registry import RegistryError


@pytest.fixture
def roots(tiny_model_dir, monkeypatch):
    """The tiny model's folder (model/ and data/) is an allowed root; no environment or embedded entry."""
    monkeypatch.setenv("DTRAK_HIDE_DEMO", "1")
    monkeypatch.delenv("DTRAK_MODEL_DIR", raising=False)
    monkeypatch.setenv(registry.ROOTS_ENV, str(tiny_model_dir.parent))
    return tiny_model_dir.parent


def outside_message(what: str, folder) -> str:
    return (f"{what} {str(folder)!r} is not under an allowed root (models/, the cache, or a folder listed in "
            "DTRAK_MODEL_ROOTS); move or copy it there (a link out is followed), or add its parent to "
            "DTRAK_MODEL_ROOTS where the app "
            "is started")


def test_register_checks_and_lists(tiny_model_dir, roots, tmp_path, monkeypatch):
    data = roots / "data"
    entry = registry.register_model("tiny-1", tiny_model_dir, data, tmp_path)
    assert [e.name for e in registry.list_models(tmp_path)] == ["tiny-1"]
    assert entry.model_dir == str(tiny_model_dir.resolve())
    monkeypatch.setenv("DTRAK_MODEL_DIR", str(tiny_model_dir))
    monkeypatch.setenv("DTRAK_MODEL_NAME", "env")
    assert [(e.name, e.source) for e in registry.list_models(tmp_path)] == [("env", "environment"),
                                                                          ("tiny-1", "registered")]


def test_a_taken_name_is_replaced_only_when_asked(tiny_model_dir, roots, tmp_path):
    data = roots / "data"
    registry.register_model("tiny-1", tiny_model_dir, data, tmp_path)
    before = registry.registry_path(tmp_path).read_bytes()
    with pytest.raises(RegistryError) as refused:
        registry.register_model("tiny-1", tiny_model_dir, data, tmp_path)
    assert str(refused.value) == (f"a model named 'tiny-1' is already registered (pipeline folder "
                                  f"{tiny_model_dir.resolve()}, training images {data.resolve()}); choose another "
                                  "name or ask to replace it")
    assert registry.registry_path(tmp_path).read_bytes() == before  # untouched
    link = roots / "model-link"
    if not link.exists():
        link.symlink_to(tiny_model_dir)
    registry.register_model("tiny-1", link, data, tmp_path, replace=True)
    rows = json.loads(registry.registry_path(tmp_path).read_text())
    assert [r["name"] for r in rows] == ["tiny-1"]  # replaced, not added
    assert rows[0]["model_dir"] == str(tiny_model_dir.resolve())  # stored resolved


def test_embedded_and_environment_names_cannot_be_registered(tiny_model_dir, roots, tmp_path, monkeypatch):
    monkeypatch.setenv("DTRAK_MODEL_DIR", str(tiny_model_dir))
    monkeypatch.setenv("DTRAK_MODEL_NAME", "env")
    with pytest.raises(RegistryError, match="^model name 'env' belongs to the environment model; choose another name$"):
        registry.register_model("env", tiny_model_dir, roots / "data", tmp_path)
    monkeypatch.delenv("DTRAK_HIDE_DEMO")
    with pytest.raises(RegistryError, match="^model name 'emoji3-mini' belongs to the embedded model"):
        registry.register_model("emoji3-mini", tiny_model_dir, roots / "data", tmp_path)
    assert not registry.registry_path(tmp_path).exists()


def test_allowed_roots_are_models_the_cache_and_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(registry.ROOTS_ENV, raising=False)
    assert registry.allowed_roots(tmp_path) == [paths.MODELS_DIR.resolve(), tmp_path.resolve()]
    monkeypatch.setenv(registry.ROOTS_ENV, os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b")]))
    assert registry.allowed_roots(tmp_path) == [paths.MODELS_DIR.resolve(), tmp_path.resolve(),
                                                (tmp_path / "a").resolve(), (tmp_path / "b").resolve()]


def test_outside_the_roots_is_refused_alike_whether_or_not_it_exists(tiny_model_dir, tmp_path, monkeypatch):
    # Only the cache (tmp_path/cache) is allowed: the tiny model exists but lies outside it.
    monkeypatch.setenv("DTRAK_HIDE_DEMO", "1")
    monkeypatch.delenv(registry.ROOTS_ENV, raising=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    opened = []
    monkeypatch.setattr(registry, "load_model", lambda folder: opened.append(folder))
    (cache / "escape").symlink_to(tiny_model_dir)  # a link inside the cache to a folder outside
    cases = [tiny_model_dir, tmp_path / "no-such-folder", "/etc", cache / "escape",
             f"{cache}/../cache", "", str(cache / "x\0y")]
    for folder in cases:
        with pytest.raises(RegistryError) as refused:
            registry.register_model("x", folder, cache, cache)
        assert str(refused.value) == outside_message("model folder", folder)
    with pytest.raises(RegistryError) as refused:
        registry.register_model("x", cache, tiny_model_dir.parent / "data", cache)
    assert str(refused.value) == outside_message("training image folder", tiny_model_dir.parent / "data")
    assert opened == [] and not registry.registry_path(cache).exists()  # nothing was read or written


def test_bad_registrations_inside_the_roots_say_why(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(registry.ROOTS_ENV, os.pathsep.join([str(tmp_path), str(tiny_model_dir.parent)]))
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
