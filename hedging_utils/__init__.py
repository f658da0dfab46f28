"""Machinery behind the Feature Hedging notebooks.

Modules, one concept each:

- ``profiles``: the ``ci`` / ``small`` / ``paper`` profiles and parameter checks;
- ``cache``: settings-keyed, atomically written disk cache, and the source hash that keys follow the code with;
- ``progress``: progress bars and timings, live in JupyterLab and in a log file headless;
- ``precision``: bfloat16 products for the LLM work where the hardware has bfloat16 units, float32 elsewhere;
- ``training``: one ``TrainSettings``; building, training (a sweep as one stacked computation) and caching SAEs;
- ``toys``: toy models of orthogonal features on SAELens' synthetic data, and the SAEs trained on them;
- ``combinations``: the "true features" post's toy of co-firing features and a rare one;
- ``theory``: exact loss curves of a tied latent and the MSE-optimal (OLS) decoder of appendix A.4;
- ``variants``: balance matryoshka (L1, BatchTopK) and MSE / L2 / snap losses as SAELens architectures;
- ``orthogonality``: the decoder-orthogonality penalties (pairwise and OrtSAE's chunked form) as SAELens architectures;
- ``extension``: extending an SAE by N latents, control vs extended on identical batches, growing SAEs;
- ``text``: the offline corpus (its sources, licences and mix), the Pile, or a user's own files;
- ``activations``: the language model (offline Gemma 3 270M or the paper's models), the checks before
  compute, and the settings-keyed activation cache read as training streams;
- ``llm``: LLM SAE experiments on those activations: SAEs trained together, the recipes of notebooks
  04-06, hedging degree of an SAE grown by a few latents;
- ``saebench``: SAEBench's absorption, k-sparse probing (sae-probes' tasks) and TPP (AG News topics),
  offline on the project's model, and the paper's part-of-speech probing; SCR says why it is not run;
- ``ground_truth``: SAEs against a known synthetic model (SAELens' SynthSAEBench recipe): true hedging,
  absorption, and SAELens' synthetic evaluation;
- ``metrics``: hedging degree (and the authors' clamped hedging rate) and the measurements the notebooks sweep;
- ``plotting``: the tidy heatmap schema and the plots drawn from it;
- ``figures``: saving figures with their data, settings and three-valued verdicts in the manifest;
- ``regenerate``: running the notebooks headlessly with papermill (``make figures``);
- ``reading``: the README's verdict table and an HTML copy of the executed notebooks;
- ``browser_check``: screenshots of that copy and of JupyterLab in headless Chromium (``make browser-check``);
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
