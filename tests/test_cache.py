"""The settings-keyed disk cache: one build per key, atomic entries, keys that follow the code."""

import json

import pytest

from hedging_utils import cache
from hedging_utils.cache import cache_root, cached_dir, cached_entry, settings_key, source_hash


def test_the_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HEDGING_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"


def test_keys_are_stable_and_differ_with_any_setting():
    assert settings_key({"a": 1, "b": [1, 2]}) == settings_key({"b": [1, 2], "a": 1})  # order does not matter
    assert len({settings_key({"a": 1}), settings_key({"a": 2}), settings_key({"a": 1, "b": None})}) == 3


def test_an_entry_is_built_once_and_then_read():
    calls = []

    def build(path):
        calls.append(path)
        (path / "value.txt").write_text("42")

    assert cached_entry("things", {"x": 1}) is None
    first = cached_dir("things", {"x": 1}, build)
    again = cached_dir("things", {"x": 1}, build)
    assert first == again == cached_entry("things", {"x": 1}) and len(calls) == 1
    assert (first / "value.txt").read_text() == "42"
    assert json.loads((first / "settings.json").read_text()) == {"x": 1}
    cached_dir("things", {"x": 2}, build)
    assert len(calls) == 2


def test_a_failed_build_leaves_no_entry_and_a_rerun_builds_it():
    def failing(path):
        (path / "half.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cached_dir("things", {"x": 1}, failing)
    assert cached_entry("things", {"x": 1}) is None
    assert list((cache_root() / "things").iterdir()) == []  # no temporary directory left behind
    path = cached_dir("things", {"x": 1}, lambda p: (p / "ok.txt").write_text("ok"))
    assert sorted(f.name for f in path.iterdir()) == ["ok.txt", "settings.json"]


def test_an_incomplete_entry_is_rebuilt():
    final = cache_root() / "things" / settings_key({"x": 1})
    final.mkdir(parents=True)
    (final / "stale.txt").write_text("from an older layout, never completed")
    path = cached_dir("things", {"x": 1}, lambda p: (p / "ok.txt").write_text("ok"))
    assert sorted(f.name for f in path.iterdir()) == ["ok.txt", "settings.json"]


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A stand-in package directory whose sources the tests edit."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    for name in ("training", "variants", "plotting"):
        (folder / f"{name}.py").write_text(f"# {name}\nX = 1\n")
    monkeypatch.setattr(cache, "PACKAGE_DIR", folder)
    return folder


def test_the_source_hash_follows_an_edit_to_its_modules_and_only_to_them(package):
    before, whole = source_hash(["training", "variants"]), source_hash()
    (package / "plotting.py").write_text("# plotting\nX = 2\n")
    assert source_hash(["training", "variants"]) == before and source_hash() != whole
    (package / "variants.py").write_text("# variants\nX = 2\n")
    assert source_hash(["training", "variants"]) != before
    assert source_hash(["variants", "training"]) == source_hash(["training", "variants"])


def test_the_source_hash_tells_which_file_holds_which_text(package):
    """The same text in another module is another hash (each file's name is hashed with it)."""
    (package / "training.py").write_text("X = 1\n")
    (package / "variants.py").write_text("X = 1\n")
    assert source_hash(["training"]) != source_hash(["variants"])


def test_an_unknown_module_is_refused(package):
    with pytest.raises(FileNotFoundError, match="no module 'trainingg'"):
        source_hash(["trainingg"])


def test_the_real_package_hash_covers_every_module():
    assert source_hash() == source_hash([p.stem for p in cache.PACKAGE_DIR.glob("*.py")])
    assert source_hash() != source_hash(["training"])


@pytest.fixture
def importing_package(tmp_path, monkeypatch):
    """A stand-in ``hedging_utils`` whose modules import each other: a -> b (inside a function) -> c; d alone."""
    folder = tmp_path / "hedging_utils"
    folder.mkdir()
    sources = {"__init__": "from hedging_utils import c as _c\n",
               "a": "import numpy\n\ndef f():\n    from hedging_utils.b import g\n    return g()\n",
               "b": "from hedging_utils import c\n\ndef g():\n    return c.X\n",
               "c": "X = 1\n", "d": "import hedging_utils.profiles\nY = 2\n", "profiles": "Z = 3\n"}
    for name, text in sources.items():
        (folder / f"{name}.py").write_text(text)
    monkeypatch.setattr(cache, "PACKAGE_DIR", folder)
    return folder


def test_imports_are_found_in_every_form(importing_package):
    source = ("import os\nimport hedging_utils.a\nfrom hedging_utils import b, nothing\n"
              "def h():\n    from hedging_utils.d import Y\n    import hedging_utils\n")
    assert cache.imported_modules(source) == {"__init__", "a", "b", "d"}
    assert cache.imported_modules("import hedging_utilsx\nfrom . import a\n") == set()


def test_a_notebooks_code_version_follows_the_modules_it_reaches_and_only_them(importing_package):
    notebook = "from hedging_utils.a import f\n"
    assert cache.module_closure(cache.imported_modules(notebook)) == ["__init__", "a", "b", "c"]
    before = cache.code_version(notebook)
    (importing_package / "d.py").write_text("import hedging_utils.profiles\nY = 3\n")  # not reached
    (importing_package / "profiles.py").write_text("Z = 4\n")  # its numbers are recorded settings
    assert cache.code_version(notebook) == before
    (importing_package / "c.py").write_text("X = 2\n")  # reached through a function's import in a
    assert cache.code_version(notebook) != before
    assert cache.code_version("import hedging_utils.d\n") == cache.source_hash(["__init__", "c", "d"])


def test_a_notebooks_source_is_its_code_cells_without_magics(tmp_path):
    cells = [{"cell_type": "markdown", "source": ["import hedging_utils.a"]},
             {"cell_type": "code", "source": ["%matplotlib inline\n", "from hedging_utils import b\n"]},
             {"cell_type": "code", "source": "!pip list\nx = 1"}]
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps({"cells": cells}))
    assert cache.notebook_source(path) == "from hedging_utils import b\nx = 1"


def test_every_real_notebook_reaches_the_modules_that_write_its_figures():
    from hedging_utils.regenerate import notebooks
    for path in notebooks():
        reached = cache.module_closure(cache.imported_modules(cache.notebook_source(path)))
        assert {"__init__", "figures", "cache", "variants"} <= set(reached), path.name
