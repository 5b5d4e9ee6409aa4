import json

import nbformat
import pytest

from tdlib import pipeline
from tdlib.results import read_results, write_results


def test_numbered_notebooks_are_found_in_order():
    names = [p.name for p in pipeline.numbered_notebooks()]
    assert names and names == sorted(names)
    assert names[0] == "00_organism.ipynb"


def test_two_notebooks_with_one_number_are_refused(tmp_path):
    for name in ("01_a.ipynb", "01_b.ipynb"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(ValueError, match="share a number"):
        pipeline.numbered_notebooks(tmp_path)


def test_smoke_runs_never_write_over_committed_results(tmp_path):
    parameters = pipeline.run_parameters("organism", smoke=True, run_dir=tmp_path)
    assert parameters["config"] == "smoke"
    assert str(tmp_path) in parameters["results_dir"] and str(tmp_path) in parameters["figures_dir"]


def test_committed_notebooks_have_no_outputs_and_a_parameters_cell():
    for path in pipeline.numbered_notebooks():
        notebook = nbformat.read(path, as_version=4)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        assert any("parameters" in c.metadata.get("tags", []) for c in code), f"{path.name} lacks parameters"


def test_results_are_written_atomically_with_their_config(tmp_path):
    path = write_results("00_organism", {"n_problems": 3}, config="smoke", results_dir=tmp_path)
    assert json.loads(path.read_text()) == {"config": "smoke", "n_problems": 3}
    assert read_results("00_organism", tmp_path)["config"] == "smoke"
    assert [p.name for p in tmp_path.iterdir()] == ["00_organism.json"]
    with pytest.raises(ValueError, match="configuration name"):
        write_results("00_organism", {}, config="", results_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="make figures"):
        read_results("01_train", tmp_path)


def test_organism_notebook_runs_end_to_end_on_the_smoke_config(tmp_path):
    run_dir = pipeline.run_pipeline(smoke=True, only=["00"], run_dir=tmp_path)
    results = json.loads((run_dir / "results" / "00_organism.json").read_text())
    assert results["config"] == "smoke"
    assert set(results) >= {"base", "target", "hybrid", "n_problems", "seed"}
    for model in ("base", "target", "hybrid"):
        assert set(results[model]) >= {"accuracy", "mean_response_tokens", "wait_rate"}
    assert (run_dir / "figures" / "00_organism.png").stat().st_size > 10_000
    assert (run_dir / "00_organism.ipynb").exists()
