"""Bad notebook parameters stop the notebook in its first cell with a message naming them."""

from pathlib import Path

import papermill as pm
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.parametrize("parameters,message", [
    ({"profile": "fast"}, "profile='fast' is not a known profile"),
    ({"profile": "ci", "seed": -1}, "seed=-1"),
])
def test_bad_parameter_stops_the_first_cell(notebook, parameters, message, tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(str(notebook), str(tmp_path / notebook.name), parameters=parameters,
                            kernel_name="python3", progress_bar=False, cwd=str(notebook.parent))
    assert "ParameterError" in info.value.ename
    assert message in info.value.evalue
    # the error comes from the first cell after the parameters: nothing was trained
    assert not (tmp_path / "cache").exists()
