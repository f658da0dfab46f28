"""A disk cache keyed by settings, written atomically.

An entry is a directory under ``data/cache/<kind>/<key>/`` where ``key`` hashes the settings
that produced it. It is written to a temporary sibling first and renamed into place once
complete, so an interrupted run leaves no half-written entry behind and a rerun resumes
from the entries that did finish. A key that depends on code carries ``source_hash`` of the
modules behind it, so that it follows the code without a hand-bumped version.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from hedging_utils.profiles import REPO_ROOT

CACHE_ENV = "HEDGING_CACHE_DIR"
COMPLETE_MARKER = "settings.json"
PACKAGE_DIR = Path(__file__).resolve().parent


def source_hash(modules: Iterable[str] | None = None) -> str:
    """A short sha256 of the source of this package's ``modules`` (names such as ``"training"``;
    None: every ``hedging_utils/*.py``), read in sorted order with each file's name, so that an
    edit to any of them, and only to them, changes the hash. Cache keys carry it (an SAE trained
    by older code is never reused) and so do figures (a committed figure records the code that
    produced it)."""
    names = sorted(p.stem for p in PACKAGE_DIR.glob("*.py")) if modules is None else sorted(set(modules))
    digest = hashlib.sha256()
    for name in names:
        path = PACKAGE_DIR / f"{name}.py"
        if not path.is_file():
            raise FileNotFoundError(f"hedging_utils has no module {name!r} ({path})")
        digest.update(name.encode() + b"\0")
        digest.update(path.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return digest.hexdigest()[:16]


def imported_modules(source: str) -> set[str]:
    """The names of this package's modules that Python ``source`` imports, anywhere in it
    (``import hedging_utils.x``, ``from hedging_utils import x``, ``from hedging_utils.x import y``,
    inside functions too); ``"__init__"`` for any import of the package itself."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == PACKAGE_DIR.name:
                found.add("__init__")
                if len(parts) > 1 and (PACKAGE_DIR / f"{parts[1]}.py").is_file():
                    found.add(parts[1])
    return found


def module_closure(modules: Iterable[str]) -> list[str]:
    """``modules`` and every module of this package they import, directly or not (sorted)."""
    todo, seen = set(modules), set()
    while todo:
        name = todo.pop()
        seen.add(name)
        todo |= imported_modules((PACKAGE_DIR / f"{name}.py").read_text()) - seen
    return sorted(seen)


NOT_IN_CODE_VERSION = ("profiles",)
"""Modules left out of a figure's ``code_version``: a profile's numbers enter a figure through its
recorded ``profile_settings`` (``Profile.to_dict``, which carries every scale's derived values
too), compared key by key, so adding a scale for a new notebook does not make older figures stale."""


def code_version(source: str) -> str:
    """``source_hash`` of the modules of this package that Python ``source`` (a notebook's code)
    runs: those it imports and, transitively, theirs, ``NOT_IN_CODE_VERSION`` aside. An edit to any
    of them changes it; an edit to a module it never imports does not."""
    names = [m for m in module_closure(imported_modules(source)) if m not in NOT_IN_CODE_VERSION]
    return source_hash(names)


def notebook_source(path: str | os.PathLike) -> str:
    """The code cells of a notebook, as one Python source (IPython magics and shell lines dropped)."""
    cells = json.loads(Path(path).read_text())["cells"]
    lines = [line for cell in cells if cell["cell_type"] == "code"
             for line in "".join(cell["source"]).splitlines() if not re.match(r"\s*[%!]", line)]
    return "\n".join(lines)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or REPO_ROOT / "data" / "cache")


def settings_key(settings: dict[str, Any]) -> str:
    """A short, stable hash of JSON-serialisable settings."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_entry(kind: str, settings: dict[str, Any]) -> Path | None:
    """The complete cache entry for ``settings``, or None if there is none (yet)."""
    path = cache_root() / kind / settings_key(settings)
    return path if (path / COMPLETE_MARKER).exists() else None


def cached_dir(kind: str, settings: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Return the cache directory for ``settings``, calling ``build(tmp_dir)`` to fill it
    first if it does not exist yet. ``build`` writes into a fresh temporary directory that
    becomes the entry only when ``build`` returns."""
    final = cache_root() / kind / settings_key(settings)
    if (final / COMPLETE_MARKER).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(settings, sort_keys=True, indent=1, default=str))
        if final.exists():  # an incomplete entry from an older layout: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
