"""Machinery behind the Feature Hedging notebooks.

Modules, one concept each:

- ``profiles``: the ``ci`` / ``small`` / ``paper`` profiles and parameter checks;
- ``precision``: bfloat16 products for the LLM work where the hardware has bfloat16 units, float32 elsewhere;
- ``training``: one ``TrainSettings``; building, training (a sweep as one stacked computation) and caching SAEs;
- ``toys``: toy models of orthogonal features on SAELens' synthetic data, and the SAEs trained on them;
- ``theory``: exact loss curves of a tied latent and the MSE-optimal (OLS) decoder of appendix A.4;
- ``variants``: balance matryoshka (L1, BatchTopK) and MSE / L2 / snap losses as SAELens architectures;
- ``extension``: extending an SAE by N latents, control vs extended on identical batches, growing SAEs;
- ``llm``: a language model's activations (offline Gemma 3 270M or the paper's models), and SAEs trained on them;
- ``saebench``: SAEBench's absorption, k-sparse probing (sae-probes' tasks) and TPP (AG News' topics
  from sae-probes; SCR not run), and part-of-speech probing, offline on the project's model;
- ``ground_truth``: SAEs against a known synthetic model (SAELens' SynthSAEBench recipe): true hedging,
  absorption, and SAELens' synthetic evaluation;
- ``metrics``: hedging degree (and the authors' clamped hedging rate) and the measurements the notebooks sweep;
- ``plotting``: the tidy heatmap schema and the plots drawn from it;
- ``figures``: saving figures with their data and manifest entries, and running the notebooks;
- ``cache``: settings-keyed, atomically written disk cache, and the source hash that keys follow the code with;
- ``diagnose``: the hedging diagnostic for any SAELens SAE: ``hedging_utils.diagnose(sae, activations, ...)``
  or ``python -m hedging_utils.diagnose``. It loads on first use (the notebooks never import it).
"""

import importlib

from hedging_utils import variants as _variants  # noqa: F401  (registers the SAE architectures with SAELens)

__version__ = "0.1.0"


def __getattr__(name: str):
    """``hedging_utils.diagnose``: the diagnostic module, which is also callable as its
    ``diagnose`` function (``hedging_utils.diagnose(sae, activations, n_new_latents=...)``),
    imported on first use so that the notebooks never load it."""
    if name == "diagnose":
        return importlib.import_module("hedging_utils.diagnose")
    raise AttributeError(f"module 'hedging_utils' has no attribute {name!r}")
