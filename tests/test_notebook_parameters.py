"""Bad notebook parameters stop the notebook in its first cell with a message naming them."""

from pathlib import Path

import papermill as pm
import pytest

from hedging_utils.llm import hub_reachable

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.parametrize("parameters,message", [
    ({"profile": "fast"}, "profile='fast' is not a known profile"),
    ({"profile": "ci", "seed": -1}, "seed=-1"),
])
def test_bad_parameter_stops_the_first_cell(notebook, parameters, message, tmp_path):
    info = _run_expecting_error(notebook, parameters, tmp_path)
    assert "ParameterError" in info.value.ename
    assert message in info.value.evalue
    # the error comes from the first cell after the parameters: nothing was trained
    assert not (tmp_path / "cache").exists()


LLM_NOTEBOOK = next(nb for nb in NOTEBOOKS if nb.name.startswith("04_"))


@pytest.mark.parametrize("parameters,message", [
    ({"profile": "ci", "llm_layer": 40}, "layer=40 is outside gemma-3-270m"),
    ({"profile": "ci", "llm_model": "gpt2-xl"}, "model='gpt2-xl' is not a model this project knows"),
    ({"profile": "ci", "corpus": "/no/such/corpus"}, "corpus='/no/such/corpus' does not exist"),
    pytest.param({"profile": "paper"}, "need the Hugging Face hub",
                 marks=pytest.mark.skipif(hub_reachable(), reason="this machine reaches the hub")),
])
def test_bad_llm_setting_stops_before_any_compute(parameters, message, tmp_path):
    info = _run_expecting_error(LLM_NOTEBOOK, parameters, tmp_path)
    assert "ParameterError" in info.value.ename
    assert message in info.value.evalue
    assert not (tmp_path / "cache").exists()


def _run_expecting_error(notebook, parameters, tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(str(notebook), str(tmp_path / notebook.name), parameters=parameters,
                            kernel_name="python3", progress_bar=False, cwd=str(notebook.parent))
    return info


SAEBENCH_NOTEBOOK = next(nb for nb in NOTEBOOKS if nb.name.startswith("06_"))


@pytest.mark.parametrize("parameters,message", [
    ({"profile": "ci", "multipliers": [0.25, 1.0]}, "include 0 (a standard SAE) and 1"),
    ({"profile": "ci", "width": 8}, "width=8 gives matryoshka levels"),
    ({"profile": "ci", "loss_k_values": [0]}, "loss_k_values[0]=0"),
])
def test_bad_matryoshka_setting_stops_before_any_compute(parameters, message, tmp_path):
    info = _run_expecting_error(SAEBENCH_NOTEBOOK, parameters, tmp_path)
    assert "ParameterError" in info.value.ename
    assert message in info.value.evalue
    assert not (tmp_path / "cache").exists()
