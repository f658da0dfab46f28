"""Machinery behind the Feature Hedging notebooks.

Modules, one concept each:

- ``profiles``: the ``ci`` / ``small`` / ``paper`` profiles and parameter checks;
- ``toys``: toy models of orthogonal features on SAELens' synthetic data, and SAEs trained on them;
- ``theory``: exact loss curves of a tied latent and the MSE-optimal (OLS) decoder of appendix A.4;
- ``plotting``: the tidy heatmap schema and the plots drawn from it;
- ``figures``: saving figures with their data and manifest entries, and running the notebooks;
- ``cache``: settings-keyed, atomically written disk cache.
"""

__version__ = "0.1.0"
