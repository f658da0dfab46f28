import pytest


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    """Tests never write into the repository's cache or figures."""
    monkeypatch.setenv("HEDGING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HEDGING_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.delenv("HEDGING_PROFILE", raising=False)
