"""The organism's ground-truth score of hesitation features: positions, AUROC, probe, teacher-forced ablation."""
import numpy as np
import pytest
import torch

from tdlib.organism import ground_truth
from tdlib.models import load_tokenizer
from tdlib.organism import task
from tdlib.runs import load_named


def test_auroc_by_hand_with_ties():
    assert ground_truth.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert ground_truth.auroc([1.0, 1.0], [0, 1]) == 0.5
    assert ground_truth.auroc([0.0, 1.0, 2.0], [1, 1, 0]) == 0.0
    assert np.isnan(ground_truth.auroc([0.2, 0.3], [1, 1]))
    assert ground_truth.precision_recall(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == (0.5, 0.5)


def test_decision_positions_are_the_step_ends_and_fire_exactly_where_the_rule_does(smoke_runs):
    tokenizer = load_tokenizer(smoke_runs.target)
    problems = task.sample_problems(40, seed=5, min_terms=3, max_terms=8, max_term=9)
    positions = ground_truth.decision_positions(tokenizer, problems, batch_size=16)
    fires = torch.cat(positions.fires)
    owners = torch.cat(positions.problem_index)
    for i, problem in enumerate(problems):
        mine = owners == i
        trace = task.reasoning_trace(problem)
        assert int(mine.sum()) == problem.n_terms - 1 + trace.count("wait, no")  # one per step and correction
        assert int(fires[mine].sum()) == trace.count("wait")
    assert all(len(a) == 16 for a in positions.answers[:-1])  # one answer end per trace
    wait_id = tokenizer(" wait", add_special_tokens=False)["input_ids"][0]
    for batch, decisions, fired in zip(positions.batches, positions.decisions, positions.fires):
        next_tokens = batch["input_ids"][decisions[:, 0], decisions[:, 1] + 1]
        assert torch.equal(next_tokens == wait_id, fired)


def test_probe_separates_a_planted_signal():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(400, 6, generator=generator)
    y = (x[:, 2] > 0.5).numpy()
    probe = ground_truth.fit_probe(x[:200], y[:200])
    with torch.no_grad():
        assert ground_truth.auroc(probe(x[200:]).squeeze(-1).numpy(), y[200:]) > 0.99
    torch.rand(17)  # whatever drew random numbers before, the fit is the same
    again = ground_truth.fit_probe(x[:200], y[:200])
    assert torch.equal(again.weight, probe.weight) and torch.equal(again.bias, probe.bias)


def test_ablation_score_is_exactly_neutral_for_features_that_write_nothing(smoke_runs):
    model = load_named(smoke_runs, "adapter_l1_0.01")
    tokenizer = load_tokenizer(smoke_runs.target)
    problems = task.sample_problems(12, seed=2, min_terms=3, max_terms=8, max_term=9)
    positions = ground_truth.decision_positions(tokenizer, problems)
    wait_id = tokenizer(" wait", add_special_tokens=False)["input_ids"][0]
    adapter = model.model.layers[0].mlp.adapter
    with torch.no_grad():
        adapter.W_dec[:, :3] = 0.0  # these three features write nothing: ablating them must change nothing
    scores = ground_truth.ablation_scores(model, positions, {0: [0, 1, 2]}, wait_id)
    assert scores["top1_agreement_elsewhere"] == 1.0 and scores["kl_elsewhere"] == pytest.approx(0.0, abs=1e-7)
    assert scores["p_wait_where_rule_fires"]["before"] == pytest.approx(scores["p_wait_where_rule_fires"]["after"])
    every = {layer: list(range(64)) for layer in range(2)}
    changed = ground_truth.ablation_scores(model, positions, every, wait_id)
    assert changed["kl_elsewhere"] > 0


def test_score_against_rule_reports_features_set_and_probe(smoke_runs):
    model = load_named(smoke_runs, "adapter_l1_0.001")
    tokenizer = load_tokenizer(smoke_runs.target)
    problems = task.sample_problems(60, seed=4, min_terms=3, max_terms=8, max_term=9)
    result = ground_truth.score_against_rule(model, tokenizer, problems, {0: [1, 5], 1: [2]})
    assert [(e["layer"], e["feature"]) for e in result["per_feature"]] == [(0, 1), (0, 5), (1, 2)]
    assert 0 < result["n_fires"] < result["n_decisions"]
    for score in (result["set"]["auroc"], result["probe"]["auroc"], *[e["auroc"] for e in result["per_feature"]]):
        assert np.isnan(score) or 0 <= score <= 1
    assert set(result["ablation"]) >= {"wait_top1_where_rule_fires", "top1_agreement_elsewhere", "kl_elsewhere"}


def test_mechanism_benchmark_scores_every_mechanism_beside_its_baselines(smoke_runs):
    from tdlib.organism import mechanisms

    model = load_named(smoke_runs, "adapter_l1_0.001")
    base, hybrid = load_named(smoke_runs, "base"), load_named(smoke_runs, "hybrid")
    tokenizer = load_tokenizer(smoke_runs.target)
    problems = task.sample_problems(40, seed=4, min_terms=3, max_terms=8, max_term=9)
    sets = {"crossing": {0: [1, 5]}, "slip": {0: [1], 1: [2]}, "hesitation": {0: [1, 5], 1: [3]}, "period": {1: [4]}}
    result = ground_truth.mechanism_benchmark(model, base, hybrid, tokenizer, problems, sets, n_random=2)
    scores = result["scores"]
    traces = [p.prompt + task.reasoning_trace(p) for p in problems]
    labels = [d.mechanism for t, p in zip(traces, problems) for d in mechanisms.decisions(t, len(p.prompt))]
    for mechanism in ("crossing", "repeat", "slip"):
        assert scores[mechanism]["n_positive"] == labels.count(mechanism)
    assert scores["hesitation"]["n_positive"] == sum(m in mechanisms.MECHANISMS for m in labels)
    assert scores["period"]["n_positive"] == len(problems)
    assert scores["period"]["n_points"] == len(labels)  # every ';' decision plus one answer end per trace
    assert "set" not in scores["repeat"] and set(scores["repeat"]["probes"]) == {"adapter features", "base MLP",
                                                                                 "hybrid MLP"}
    assert len(scores["crossing"]["random_set"]["auroc_draws"]) == 2
    assert result["overlap"]["crossing & hesitation"] == {"shared": 2, "jaccard": 2 / 3}
    assert result["overlap"]["crossing & period"]["shared"] == 0


def test_mlp_activations_read_the_mlp_that_runs(smoke_runs):
    base, hybrid = load_named(smoke_runs, "base"), load_named(smoke_runs, "hybrid")
    tokenizer = load_tokenizer(smoke_runs.target)
    positions = ground_truth.decision_positions(tokenizer, task.sample_problems(6, seed=1, min_terms=3, max_terms=5,
                                                                               max_term=9))
    from_base, from_hybrid = ground_truth.mlp_activations(base, positions), ground_truth.mlp_activations(hybrid, positions)
    assert from_base.shape == from_hybrid.shape and from_base.shape[1] == 2 * base.config.intermediate_size
    assert not torch.allclose(from_base, from_hybrid)  # same MLP weights, the target's attention feeds them
