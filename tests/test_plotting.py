"""Plotting helpers that carry logic: panels over a sweep, with metrics that did not run."""

import matplotlib

matplotlib.use("Agg")

import pandas as pd

from hedging_utils.plotting import metric_panels


def test_metric_panels_draw_each_metric_and_say_which_did_not_run():
    frame = pd.DataFrame({"x": [0, 0, 1, 1], "variant": ["a", "b", "a", "b"], "ok": [1.0, 2.0, 3.0, 4.0],
                          "off": ["not run: the hub is unreachable"] * 4})
    fig = metric_panels(frame, "x", {"ok": "a metric", "off": "a hub metric"}, ncols=3)
    axes = fig.axes
    assert axes[0].get_title() == "a metric" and len(axes[0].containers) == 1  # one error-bar line
    texts = [t.get_text() for t in axes[1].texts]
    assert texts and "not run" in texts[0] and "hub" in " ".join(texts)
    assert not axes[2].axison  # the unused panel is hidden
    by_variant = metric_panels(frame, "x", {"ok": "a metric"}, hue="variant", ncols=1)
    assert [line.get_label() for line in by_variant.axes[0].lines] == ["a", "b"]


def test_latent_for_feature_reads_the_decoder_of_the_setting_and_not_the_plotted_order():
    from hedging_utils.plotting import latent_for_feature
    cells = {  # (setting, vector, latent, feature): cos_sim
        ("s", "decoder", 0, 0): 0.2, ("s", "decoder", 1, 0): 0.9, ("s", "decoder", 2, 0): -0.95,
        ("s", "decoder", 0, 1): 0.7, ("s", "decoder", 1, 1): 0.1, ("s", "decoder", 2, 1): 0.3,
        ("s", "encoder", 0, 0): 0.99,  # the encoder does not count
        ("t", "decoder", 2, 0): 0.99,  # nor does another setting
    }
    frame = pd.DataFrame([{"setting": s, "vector": v, "latent": l, "feature": f, "cos_sim": c}
                          for (s, v, l, f), c in cells.items()])
    frame["latent"] = frame["latent"].astype("Int64")
    assert latent_for_feature(frame, "s", 0) == 1  # the most aligned, not the most anti-aligned (-0.95)
    assert latent_for_feature(frame, "s", 1) == 0
    assert latent_for_feature(frame, "t", 0) == 2
