"""Where the LLM work runs its products in bfloat16, and that doing so changes nothing that
matters in a short LLM SAE run (the model's activations and predictions: tests/test_llm.py)."""

import pytest
import torch

from hedging_utils import activations, llm, precision
from hedging_utils.profiles import ParameterError
from hedging_utils.training import Job, TrainSettings, make_sae, seeded, train_together


def test_the_choice_follows_the_hardware_flags_and_the_environment(monkeypatch):
    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert precision.matmul_precision("cpu") == "bfloat16"
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx512f", "avx2"}))  # bfloat16 only emulated
    assert precision.matmul_precision("cpu") == "float32"
    monkeypatch.setenv(precision.PRECISION_ENV, "bfloat16")
    assert precision.matmul_precision("cpu") == "bfloat16"
    monkeypatch.setenv(precision.PRECISION_ENV, "half")
    with pytest.raises(ParameterError, match="HEDGING_PRECISION='half'"):
        precision.matmul_precision("cpu")


def test_llm_settings_and_activation_keys_record_the_precision(monkeypatch):
    monkeypatch.setenv(precision.PRECISION_ENV, "float32")
    assert llm.llm_settings(4096, 1024).precision == "float32"
    monkeypatch.setenv(precision.PRECISION_ENV, "bfloat16")
    assert llm.llm_settings(4096, 1024).precision == "bfloat16"
    assert llm.llm_settings(4096, 1024, precision="float32").precision == "float32"
    keys = {p: activations.activation_key("gemma-3-270m", 3, "offline", 64, 1024, p) for p in ("float32", "bfloat16")}
    assert keys["float32"] != keys["bfloat16"] and keys["bfloat16"]["precision"] == "bfloat16"


def _gaussian_jobs(architecture, **cfg):
    def stream(start):
        generator = torch.Generator().manual_seed(start)
        scale = torch.linspace(0.2, 2.0, 64)  # an anisotropic spectrum, as residual streams have
        while True:
            yield torch.randn(256, 64, generator=generator) * scale
    with seeded(0):
        sae = make_sae(64, 128, architecture, **cfg)
    return {"s": Job(sae, stream, {"gaussian": 64}, init={"seed": 0})}


BF16_LOSS_TOLERANCE = 0.01
"""A short bfloat16 SAE run ends within this relative distance of the float32 run's
reconstruction error (measured: 1e-4 for L1, 5e-4 for matryoshka BatchTopK)..."""

BF16_DECODER_COSINE = 0.995
"""... and its decoder rows keep at least this mean cosine with the float32 run's (measured:
0.99998 and 0.9993)."""


@pytest.mark.parametrize("architecture,cfg", [("standard", {"l1_coefficient": 0.05}),
                                              ("balance_matryoshka_batchtopk", {"k": 8, "matryoshka_widths": [16, 64],
                                                                               "coefficient_multiplier": 0.5})])
def test_bf16_sae_training_stays_within_tolerance_of_float32(architecture, cfg):
    runs = {}
    for p in ("float32", "bfloat16"):
        jobs = _gaussian_jobs(architecture, **cfg)
        runs[p] = train_together(jobs, TrainSettings(steps=150, batch_size=256, lr=1e-3, precision=p), progress=False)["s"]
    x = torch.randn(2048, 64, generator=torch.Generator().manual_seed(99)) * torch.linspace(0.2, 2.0, 64)
    with torch.no_grad():
        losses = {p: float(((sae.decode(sae.encode(x)) - x) ** 2).sum(-1).mean()) for p, sae in runs.items()}
    cosine = torch.nn.functional.cosine_similarity(runs["float32"].W_dec, runs["bfloat16"].W_dec, dim=1).mean().detach()
    assert abs(losses["bfloat16"] - losses["float32"]) < BF16_LOSS_TOLERANCE * losses["float32"], losses
    assert float(cosine) > BF16_DECODER_COSINE, float(cosine)
    assert not torch.equal(runs["float32"].W_dec, runs["bfloat16"].W_dec)  # the products really ran in bfloat16
