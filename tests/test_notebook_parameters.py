"""Bad notebook parameters stop the notebook in its first cell with a message naming them.

Every case runs the notebook's own cells, parameterised by papermill exactly as ``make figures``
does, in this process (``_run_in_process``): importing torch, SAELens and TransformerLens in a
fresh kernel costs ~15 s a case, and the cells that must stop are the first ones. One case runs
in a real Jupyter kernel through papermill, so the kernel path is covered too (and nbval runs
every notebook on ``ci`` in ``make test``)."""

import traceback
from pathlib import Path

import nbformat
import papermill as pm
import pytest
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from hedging_utils.activations import hub_reachable
from hedging_utils.profiles import ParameterError

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _run_in_process(notebook: Path, parameters: dict, monkeypatch) -> tuple[BaseException, int]:
    """Run the code cells of ``notebook`` with papermill's injected ``parameters`` until one
    raises; return the error and the index of the raising cell among the code cells after the
    injected-parameters cell (0: the first cell after it)."""
    nb = parameterize_notebook(load_notebook_node(str(notebook)), parameters, kernel_name="python3",
                               language="python")
    cells = [c for c in nb.cells if c.cell_type == "code"]
    injected = next(i for i, c in enumerate(cells) if "injected-parameters" in c.metadata.tags)
    monkeypatch.chdir(notebook.parent)
    namespace: dict = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        try:
            exec(compile(cell.source, f"{notebook.name}[{i}]", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            return error, i - injected - 1
    pytest.fail(f"{notebook.name} ran to the end with {parameters}")


def _expect_stop(notebook, parameters, message, monkeypatch, tmp_path):
    error, cell = _run_in_process(notebook, parameters, monkeypatch)
    assert isinstance(error, ParameterError), "".join(traceback.format_exception(error))
    assert message in str(error)
    assert cell == 0, f"stopped in cell {cell} after the parameters, not the first"
    assert not (tmp_path / "cache").exists()  # nothing was trained or cached


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.parametrize("parameters,message", [
    ({"profile": "fast"}, "profile='fast' is not a known profile"),
    ({"profile": "ci", "seed": -1}, "seed=-1"),
])
def test_bad_parameter_stops_the_first_cell(notebook, parameters, message, monkeypatch, tmp_path):
    _expect_stop(notebook, parameters, message, monkeypatch, tmp_path)


def test_a_good_parameter_passes_the_first_cell(monkeypatch, tmp_path):
    """The check above can fail: with good parameters the first cell runs, and the notebook
    stops later only because the next cell is made to raise."""
    notebook = NOTEBOOKS[0]
    nb = nbformat.read(str(notebook), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    code[2].source = "raise RuntimeError('second cell reached')"
    edited = tmp_path / notebook.name
    nbformat.write(nb, str(edited))
    error, cell = _run_in_process(edited, {"profile": "ci"}, monkeypatch)
    assert isinstance(error, RuntimeError) and cell == 1


def test_a_bad_profile_stops_a_notebook_in_a_real_kernel(tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(str(NOTEBOOKS[0]), str(tmp_path / NOTEBOOKS[0].name), parameters={"profile": "fast"},
                            kernel_name="python3", progress_bar=False, cwd=str(NOTEBOOKS[0].parent))
    assert "ParameterError" in info.value.ename
    assert "profile='fast' is not a known profile" in info.value.evalue
    assert not (tmp_path / "cache").exists()


LLM_NOTEBOOK = next(nb for nb in NOTEBOOKS if nb.name.startswith("04_"))


@pytest.mark.parametrize("parameters,message", [
    ({"profile": "ci", "llm_layer": 40}, "layer=40 is outside gemma-3-270m"),
    ({"profile": "ci", "llm_model": "gpt2-xl"}, "model='gpt2-xl' is not a model this project knows"),
    ({"profile": "ci", "corpus": "/no/such/corpus"}, "corpus='/no/such/corpus' does not exist"),
    pytest.param({"profile": "paper"}, "need the Hugging Face hub",
                 marks=pytest.mark.skipif(hub_reachable(), reason="this machine reaches the hub")),
])
def test_bad_llm_setting_stops_before_any_compute(parameters, message, monkeypatch, tmp_path):
    _expect_stop(LLM_NOTEBOOK, parameters, message, monkeypatch, tmp_path)


SAEBENCH_NOTEBOOK = next(nb for nb in NOTEBOOKS if nb.name.startswith("06_"))


@pytest.mark.parametrize("parameters,message", [
    ({"profile": "ci", "multipliers": [0.25, 1.0]}, "include 0 (a standard SAE) and 1"),
    ({"profile": "ci", "width": 8}, "width=8 gives matryoshka levels"),
    ({"profile": "ci", "loss_k_values": [0]}, "loss_k_values[0]=0"),
])
def test_bad_matryoshka_setting_stops_before_any_compute(parameters, message, monkeypatch, tmp_path):
    _expect_stop(SAEBENCH_NOTEBOOK, parameters, message, monkeypatch, tmp_path)
