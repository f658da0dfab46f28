import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    """Tests never write into the repository's cache or figures."""
    monkeypatch.setenv("HEDGING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HEDGING_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.delenv("HEDGING_PROFILE", raising=False)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state, so a test that draws without its own
    generator gives the same result on every machine and in every xdist worker."""
    torch.manual_seed(0)
