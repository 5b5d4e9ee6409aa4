"""The notebooks on a tiny Gemma 3 pair given as a pair file (tests/local_pair.py ``write_local_gemma3_pair``):
sliding-window layers, q/k norms, pre/post feed-forward norms, (1 + weight) RMSNorms, and adapters at the default
placement (the slow test) and at the "residual" one (notebook 05 here), through training (01), attribution (05) and
ablation (06) the way a user's own pair goes.

The fast test runs notebook 05 alone on an adapter trained here; the slow one (``make test-slow``) runs every
notebook on the pair file."""
import json
from dataclasses import replace

import pytest

from tdlib import pipeline
from tdlib.adapter import AdapterSet
from tdlib.models import load_tokenizer
from tdlib.pair_data import data_for
from tdlib.pairs import resolve_pair
from tdlib.results import read_results, write_results
from tdlib.sweep import default_plan, sweep_specs, train_run
from tdlib.runs import run_dir


@pytest.fixture(scope="module")
def gemma3_pair_file(tmp_path_factory):
    from local_pair import write_local_gemma3_pair

    return write_local_gemma3_pair(tmp_path_factory.mktemp("gemma3-pair"))


def check_attribution(results: dict, name: str) -> None:
    assert results["config"] == name
    assert results["hesitation_token"] == " wait" and results["n_prompts"] > 0
    assert 0 < results["hesitation_features"] < results["n_features_total"]
    check = results["linearity_check"]  # removing a node changes the logit by its graph effect
    tolerance = 1e-3 * max(1.0, abs(check["logit"]))
    assert check["nodes_checked"] > 0
    assert max(check["max_row_identity_error"], check["max_direct_effect_error"], check["max_total_effect_error"],
               check["replay_vs_model_logit_error"]) < tolerance, check


def test_attribution_notebook_runs_on_a_gemma3_pair(gemma3_pair_file, tmp_path):
    """Notebook 05 on one adapter trained here (a few steps): the replay, graph, linearity check and hesitation
    study on Gemma 3 blocks, with the adapter after the post-feed-forward norm."""
    pair = resolve_pair(str(gemma3_pair_file))
    assert json.loads((gemma3_pair_file.parent / "target" / "config.json").read_text())["model_type"] == "gemma3_text"
    plan = default_plan(pair)
    spec = sweep_specs(plan.l1_weights[:1], replace(plan.base, placement="residual"), baselines=False)[0]
    data = data_for(pair, load_tokenizer(pair.target), batch_size=plan.base.batch_size, seed=plan.base.seed)
    root = tmp_path / "train"
    train_run(pair, spec, data, root=root, progress=False)
    assert AdapterSet.load(run_dir(pair, spec.name, root) / "adapters").meta["placement"] == "residual"
    out = tmp_path / "out"
    write_results("01_train", {"analysis_model": spec.name}, config=pair.name, results_dir=out / "results")
    pipeline.run_pipeline(str(gemma3_pair_file), only=["05"], run_dir=tmp_path / "run", output_dir=out,
                          params={"05_attribution": {"train_root": str(root)}})
    check_attribution(read_results("05_attribution", out / "results"), pair.name)
    assert (out / "figures" / "05_wait_graph.json").exists()


def test_a_pair_file_chooses_the_placement(gemma3_pair_file, tmp_path):
    """``"training": {"placement": ...}`` in a pair file reaches notebook 01's plan and its printout; a misspelt
    placement is refused when the file is read; notebook 01's ``placement`` parameter wins over both."""
    from tdlib.sweep import describe_plan, notebook_plan

    values = json.loads(gemma3_pair_file.read_text())
    values["training"] = {**values.get("training", {}), "placement": "residual"}
    chosen = gemma3_pair_file.parent / "chosen.json"
    chosen.write_text(json.dumps(values))
    pair = resolve_pair(str(chosen))
    assert default_plan(pair).base.placement == "residual"
    assert "adapters at the 'residual' placement" in describe_plan(pair, default_plan(pair))[1]
    assert default_plan(resolve_pair(str(gemma3_pair_file))).base.placement is None
    assert notebook_plan(pair, placement="mlp_output").base.placement == "mlp_output"
    values["training"]["placement"] = "before_norm"
    chosen.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="placement must be None"):
        resolve_pair(str(chosen))


def test_measure_placement_compares_both_placements_on_a_pair_file(gemma3_pair_file, tmp_path):
    """``scripts/measure_placement.py --config``: one adapter per placement at the same settings, each saved with
    its placement, with the held-out KL and L0 of notebook 01 and the training KL's largest value."""
    from measure_placement import main, measure_pair

    rows = measure_pair(str(gemma3_pair_file), l1_weights=[1e-3], steps=3, root=tmp_path / "runs", progress=False)
    hybrid, *trained = rows
    n_layers = json.loads((gemma3_pair_file.parent / "target" / "config.json").read_text())["num_hidden_layers"]
    assert hybrid["run"] == "hybrid" and hybrid["held_out_kl"] > 0
    assert len(hybrid["post_norm_gain"]) == n_layers and min(hybrid["post_norm_gain"]) > 0
    assert [row["placement"] for row in trained] == ["mlp_output", "residual"]
    for row in trained:
        assert AdapterSet.load(tmp_path / "runs" / row["run"] / "adapters").meta["placement"] == row["placement"]
        assert row["steps"] == 3 and row["l0"] >= 0 and row["max_train_kl"] >= row["final_train_kl"]
        assert row["warmup"] == 0.05
    # one placement with a longer warm-up: its own run folder, the warm-up recorded
    _, warmed = measure_pair(str(gemma3_pair_file), l1_weights=[1e-3], steps=3, root=tmp_path / "runs",
                             progress=False, placements=["mlp_output"], warmup=0.25)
    assert (warmed["run"], warmed["placement"], warmed["warmup"]) == ("mlp_output_l1_0.001_warmup_0.25", "mlp_output",
                                                                      0.25)
    assert trained[0]["held_out_kl"] != trained[1]["held_out_kl"]  # two different places to add
    residual = trained[1]  # the default placement trains stably from the first step
    assert residual["max_train_kl"] < 1.5 * residual["first_train_kl"], residual
    out = tmp_path / "rows.json"  # the command reuses the finished runs and writes the same rows
    main(["--config", str(gemma3_pair_file), "--l1", "1e-3", "--steps", "3", "--root", str(tmp_path / "runs"),
          "--out", str(out)])
    assert json.loads(out.read_text()) == rows


@pytest.mark.slow
def test_every_notebook_runs_on_a_gemma3_pair_file(gemma3_pair_file, tmp_path):
    name = json.loads(gemma3_pair_file.read_text())["name"]
    pipeline.run_pipeline(str(gemma3_pair_file), run_dir=tmp_path, output_dir=tmp_path)
    results = {p.stem: read_results(p.stem, tmp_path / "results") for p in pipeline.numbered_notebooks()}
    assert all(entry["config"] == name for entry in results.values())
    train = results["01_train"]
    kinds = {m["kind"] for m in train["models"].values()}
    assert kinds == {"hybrid", "adapter", "mlp_finetune", "local_mse"}
    for model in train["models"].values():
        if model["kind"] in ("adapter", "local_mse"):  # FVU against the difference after the post-MLP norm
            assert all(v >= 0 for v in model["fvu_target_inputs_by_layer"])
    check_attribution(results["05_attribution"], name)
    ablation = results["06_ablation"]
    assert ablation["feature_source"] == "05_attribution" and ablation["n_problems"] == 8
    groups = results["05_attribution"]["groups"]
    both = groups["output"]["count"] + groups["template"]["count"]  # both groups: suppressors are left out
    assert ablation["n_features_chosen"] == (both or results["05_attribution"]["hesitation_features"])
    assert ablation["set_sizes"]["all"] == results["05_attribution"]["hesitation_features"]
    assert {"adapter", "ablated", "random_control", "steered"} <= set(ablation)
