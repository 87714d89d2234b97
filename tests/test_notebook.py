"""The walkthrough notebook runs clean, top to bottom, on the shipped sample; it is committed without outputs."""
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def test_the_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert "widgets" not in notebook.metadata  # no saved progress-bar state either


@pytest.mark.slow
def test_the_notebook_runs_clean_on_the_shipped_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("DASK_PIPELINE__WEIGHTS", "random")  # offline here: no ImageNet download
    monkeypatch.setenv("DASK_PIPELINE__LOCAL_CLUSTER__DASHBOARD_ADDRESS", "127.0.0.1:0")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    streams = {name: "".join(o.text for o in outputs if o.output_type == "stream" and o.name == name) for name in ("stdout", "stderr")}
    assert not re.search(r"\w+Warning\b|Traceback", streams["stderr"]), streams["stderr"]  # Python's; TensorFlow's C++ log is its own
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+/status$", streams["stdout"], re.MULTILINE)
    assert "images listed  129" in streams["stdout"] and "of each image's 5 nearest neighbours share its label" in streams["stdout"]
    assert re.search(r"^accuracy   0\.\d+ on \d+ test images", streams["stdout"], re.MULTILINE)
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 7  # samples per label, explained variance, PCA scatter, neighbours, confusion matrix, timings, a photo preprocessed
    assert (tmp_path / "walkthrough-output" / "report" / "report.html").exists()
