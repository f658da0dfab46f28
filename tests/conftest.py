import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _shared_model_conversion():
    """The offline model converted from its GGUF file (about 100 s) is kept where ``make test``'s
    notebook run keeps it (``data/cache/ci/models``), so that every test process and notebook of
    a run, and every later run, converts it at most once. It depends only on installed packages
    (``activations.offline_model_key``). A user's own ``HEDGING_MODEL_CACHE_DIR`` is respected."""
    with pytest.MonkeyPatch.context() as patch:
        if not os.environ.get("HEDGING_MODEL_CACHE_DIR"):
            patch.setenv("HEDGING_MODEL_CACHE_DIR", str(REPO / "data" / "cache" / "ci" / "models"))
        yield


@pytest.fixture(scope="module")
def model():
    """The offline model (Gemma 3 270M) in TransformerLens, once per test module."""
    from hedging_utils.activations import load_model
    return load_model("gemma-3-270m")


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    """Tests never write into the repository's cache or figures (the converted model aside: above)."""
    monkeypatch.setenv("HEDGING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HEDGING_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.delenv("HEDGING_PROFILE", raising=False)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state, so a test that draws without its own
    generator gives the same result on every machine and in every xdist worker."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_corpus(tmp_path):
    """A two-file corpus (a .txt and a .jsonl), for the LLM tests' short activation caches."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("The cat sat on the mat. " * 40)
    (folder / "b.jsonl").write_text('{"text": "Paris is the capital of France."}\n{"text": "def f(x):\\n    return x"}\n' * 20)
    return str(folder)


@pytest.fixture
def tiny_cache():
    """``tiny_cache(model, corpus, **kwargs)``: layers 1 and 2 of ``model`` on ``corpus``, 96 tokens."""
    from hedging_utils.activations import cache_activations

    def cache(model, corpus, **kwargs):
        return cache_activations("gemma-3-270m", [1, 2], corpus, context_size=16, n_tokens=96, shard_sequences=2,
                                 model_batch_sequences=2, loaded_model=model, progress=False, **kwargs)
    return cache
