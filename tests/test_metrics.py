"""The project's metric conventions, each checked against a hand computation on a tiny example (tdlib.metrics), and
the places that use them: training (the last real position is never trained), held-out evaluation, dead features
and the bridge-cut random stream."""
import dataclasses
import json
import math
import random
from collections import Counter

import pytest
import torch

from test_train import RandomBatches, spliced_model
from tdlib import faithfulness, metrics
from tdlib.metrics import (RunningFVU, dead_fraction_heldout, dead_fraction_train, fvu, kl_divergence, l0,
                           next_token_mask, nmse_by_layer, nmse_layers, nmse_with_embedding, token_kl,
                           top1_disagreement)
from tdlib.splice import set_mlp_choice
from tdlib.train import (TrainConfig, cut_for_step, naive_objective, objective, run_dead_features, train,
                         training_identity)


# ------------------------------------------------------------------------------------------- hand computations

def test_next_token_mask_drops_the_last_real_position_for_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert next_token_mask(right).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    assert next_token_mask(left).tolist() == [[0, 1, 1, 0], [0, 0, 1, 0]]
    assert next_token_mask(right).dtype == right.dtype


def test_kl_by_hand():
    # position 0: p = (1/2, 1/2), q = (1/4, 3/4); position 1: p = q; position 2: p = (1/4, 3/4), q = (1/2, 1/2)
    p = torch.tensor([[[0.5, 0.5], [0.3, 0.7], [0.25, 0.75]]])
    q = torch.tensor([[[0.25, 0.75], [0.3, 0.7], [0.5, 0.5]]])
    kl_0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_2 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    per_position = token_kl(p.log(), q.log())  # logits up to a constant: log-probabilities
    assert per_position[0].tolist() == pytest.approx([kl_0, 0.0, kl_2], abs=1e-6)
    # the token set: position 2 is the last real token, so only positions 0 and 1 count
    positions = next_token_mask(torch.tensor([[1, 1, 1]]))
    assert kl_divergence(p.log(), q.log(), positions).item() == pytest.approx(kl_0 / 2, abs=1e-6)
    assert metrics.kl_from_log_probs(p.log(), q.log())[0, 2].item() == pytest.approx(kl_2, abs=1e-6)


def test_top1_disagreement_by_hand():
    target = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]]])
    model = torch.tensor([[[2.0, 1.0, 0.0], [3.0, 0.0, 1.0], [5.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    # argmax: target 0, 1, 2, 0; model 0, 0, 0, 1 -> disagree at 1, 2, 3; position 3 is not scored (last real)
    positions = next_token_mask(torch.tensor([[1, 1, 1, 1]]))
    assert top1_disagreement(target, model, positions).item() == pytest.approx(2 / 3)
    assert metrics.token_top1_disagreement(target, model).tolist() == [[0.0, 1.0, 1.0, 1.0]]


def test_nmse_by_hand_with_and_without_the_embedding_entry():
    mask = torch.tensor([[1, 1, 0]])  # the padding position carries a huge error that must not count
    target = [torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]]),    # embedding output
              torch.tensor([[[2.0, 0.0], [0.0, 2.0], [9.0, 9.0]]]),    # layer 0 output
              torch.tensor([[[1.0, 1.0], [1.0, 1.0], [9.0, 9.0]]])]    # layer 1 output
    model = [target[0].clone(),                                        # shared embeddings: exact
             torch.tensor([[[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]]),     # error 1 over norm 8
             torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])]     # error 2 over norm 4
    by_layer = nmse_by_layer(model, target, mask)
    assert by_layer.tolist() == pytest.approx([0.0, 1 / 8, 2 / 4])
    assert nmse_layers(by_layer.tolist()) == pytest.approx((1 / 8 + 1 / 2) / 2)
    assert nmse_with_embedding(by_layer.tolist()) == pytest.approx((0 + 1 / 8 + 1 / 2) / 3)
    assert metrics.nmse(model, target, mask).item() == pytest.approx((0 + 1 / 8 + 1 / 2) / 3)  # the training term


def test_fvu_by_hand_and_accumulated_over_batches():
    truth = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1); total variance 1 + 1 + 1 + 1 = 4
    prediction = torch.tensor([[2.0, 1.0], [2.0, 1.0]])  # the mean: explains nothing
    assert fvu(prediction, truth) == pytest.approx(1.0)
    assert fvu(truth, truth) == 0
    assert fvu(torch.tensor([[1.0, 0.0], [3.0, 1.0]]), truth) == pytest.approx(1 / 4)
    rows = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    guess = rows + 0.3 * torch.randn(10, 3, generator=torch.Generator().manual_seed(1))
    running = RunningFVU()
    running.add(guess[:4], rows[:4])
    running.add(guess[4:], rows[4:])
    assert running.value() == pytest.approx(fvu(guess, rows), rel=1e-9)


def test_l0_by_hand():
    acts = torch.tensor([[[0.0, 1.0, 2.0], [0.0, 0.0, 0.5], [3.0, 3.0, 3.0]]])
    assert l0(acts, torch.tensor([[1, 1, 0]])).item() == pytest.approx((2 + 1) / 2)  # every real position counts
    assert l0(acts, torch.tensor([[1, 1, 1]])).item() == pytest.approx((2 + 1 + 3) / 3)


def test_dead_fractions_by_hand():
    since = {0: torch.tensor([0, 50, 100, 150]), 1: [200, 10, 0, 99]}
    assert dead_fraction_train(since, dead_after_tokens=100, train_tokens=1000) == pytest.approx(3 / 8)
    assert dead_fraction_train(since, dead_after_tokens=100, train_tokens=99) is None  # window longer than the run
    assert dead_fraction_train(since, dead_after_tokens=100, train_tokens=None) is None
    fired = {0: torch.tensor([True, False, True]), 2: torch.tensor([False, False, True])}
    assert dead_fraction_heldout(fired) == pytest.approx(3 / 6)


# ------------------------------------------------------------------------- the last real position is never scored

def _with_last_real_token_changed(batch):
    """The batch with the token at each row's last real position replaced (only the logits there can change)."""
    changed = {k: v.clone() for k, v in batch.items()}
    last = batch["attention_mask"].sum(-1) - 1
    rows = torch.arange(len(last))
    changed["input_ids"][rows, last] = (batch["input_ids"][rows, last] + 7) % 90 + 1
    return changed


@pytest.mark.parametrize("chunk", [None, 3])
def test_the_prediction_at_the_last_real_token_is_never_trained(chunk):
    model = spliced_model()
    batch = RandomBatches().batch(0)
    changed = _with_last_real_token_changed(batch)
    config = TrainConfig(n_features=16, l1_weight=0.01, kl_chunk_tokens=chunk)
    with torch.no_grad():
        before, after = objective(model, batch, config, cut=1), objective(model, changed, config, cut=1)
    assert after.kl == pytest.approx(before.kl.item(), abs=1e-7)
    assert after.bridge_kl == pytest.approx(before.bridge_kl.item(), abs=1e-7)
    assert after.nmse != pytest.approx(before.nmse.item(), abs=1e-7)  # the position is in the batch: NMSE sees it
    kl_only = dataclasses.replace(config, lambda_nmse=0.0, l1_weight=0.0)
    with torch.no_grad():
        assert naive_objective(model, changed, kl_only, 2) == pytest.approx(
            naive_objective(model, batch, kl_only, 2).item(), abs=1e-7)


def test_kl_token_set_excludes_exactly_the_last_real_position():
    logits, other = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    scored = next_token_mask(mask)
    edited = other.clone()
    edited[0, 2] += 5 * torch.randn(11)  # row 0's last real position
    edited[1, 4] += 5 * torch.randn(11)  # row 1's last real position
    assert kl_divergence(logits, edited, scored) == pytest.approx(kl_divergence(logits, other, scored).item())
    assert kl_divergence(logits, edited, mask) != pytest.approx(kl_divergence(logits, other, mask).item())


def test_held_out_metrics_use_the_conventions():
    model = spliced_model()
    set_mlp_choice(model, "adapter")
    batches = [RandomBatches().batch(0), RandomBatches().batch(1)]
    result = faithfulness.evaluate_replacement(model, batches, "adapter")
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert result["n_real_tokens"] == real and result["n_tokens"] == real - 6  # 3 rows per batch lose one each
    # the KL recomputed by hand over the token set
    from tdlib.splice import mlp_choice

    total = 0.0
    for b in batches:
        with torch.no_grad():
            with mlp_choice(model, "target"):
                target_logits = model(**b).logits
            logits = model(**b).logits
        total += float((token_kl(target_logits, logits) * next_token_mask(b["attention_mask"])).sum())
    assert result["kl"] == pytest.approx(total / result["n_tokens"], rel=1e-5)
    assert result["nmse_by_layer"][0] == 0  # the embedding entry: shared
    assert result["nmse_layers"] == pytest.approx(sum(result["nmse_by_layer"][1:]) / 3)
    assert result["nmse_with_embedding"] == pytest.approx(sum(result["nmse_by_layer"]) / 4)
    assert len(result["fvu_by_layer"]) == len(result["fvu_target_inputs_by_layer"]) == 3
    assert result["fvu_by_layer"][0] == pytest.approx(result["fvu_target_inputs_by_layer"][0], rel=1e-5)  # same x
    # the FVU at the target's own MLP inputs, recomputed by hand for the last layer
    from tdlib.residual import capture_mlp_inputs
    from tdlib.splice import mlp_difference, spliced_mlps

    mlp, running = spliced_mlps(model)[2], RunningFVU()
    for b in batches:
        with torch.no_grad(), mlp_choice(model, "target"), capture_mlp_inputs(model) as inputs:
            model(**b)
            x = inputs[2][b["attention_mask"].bool()]
            running.add(mlp.adapter(x).out, mlp_difference(mlp, x))
    assert result["fvu_target_inputs_by_layer"][2] == pytest.approx(running.value(), rel=1e-5)
    assert 0 <= result["dead_fraction_heldout"] <= 1 and result["l0"] > 0
    first_half = faithfulness.evaluate_replacement(model, batches[:1], "adapter")
    assert result["dead_fraction_heldout_half"] == pytest.approx(first_half["dead_fraction_heldout"])
    assert result["dead_fraction_heldout_half"] >= result["dead_fraction_heldout"]  # fewer tokens, fewer fire


# ----------------------------------------------------------------------------------------------- dead features

def test_dead_features_of_a_run_count_the_training_window(tmp_path):
    config = TrainConfig(n_features=16, l1_weight=0.01, steps=4, batch_size=3, dead_after_tokens=10)
    result = train(spliced_model(), RandomBatches(), config, tmp_path, progress=False)
    per_step = [int(RandomBatches().batch(s)["attention_mask"].sum()) for s in range(4)]
    assert [row["tokens"] for row in result.log] == [sum(per_step[:i + 1]) for i in range(4)]
    info = {"train_config": dataclasses.asdict(config),
            "tokens_since_fired": {str(k): v.tolist() for k, v in result.tokens_since_fired.items()}}
    dead = run_dead_features(tmp_path, info)
    expected = torch.cat(list(result.tokens_since_fired.values())).ge(10).float().mean().item()
    assert dead == {"dead_fraction_train": pytest.approx(expected), "dead_after_tokens": 10}
    long_window = json.loads(json.dumps(info))
    long_window["train_config"]["dead_after_tokens"] = 10_000  # longer than the run's 4 steps
    assert run_dead_features(tmp_path, long_window)["dead_fraction_train"] is None
    mlp = {**info, "train_config": {**info["train_config"], "kind": "mlp_finetune"}}
    assert run_dead_features(tmp_path, mlp)["dead_fraction_train"] is None


def test_the_dead_feature_window_does_not_change_the_run():
    config = TrainConfig(n_features=16)
    assert training_identity(dataclasses.replace(config, dead_after_tokens=5)) == training_identity(config)
    with pytest.raises(ValueError, match="dead_after_tokens"):
        TrainConfig(dead_after_tokens=0)


def test_runs_trained_under_the_old_conventions_are_not_the_same_run():
    current = dataclasses.asdict(TrainConfig(n_features=16))
    old = {k: v for k, v in current.items() if k != "objective_version"}
    assert training_identity(old) != training_identity(current)
    with pytest.raises(ValueError, match="objective_version"):
        TrainConfig(objective_version=1)


# -------------------------------------------------------------------------------------- separate random streams

def test_bridge_cuts_and_the_data_stream_are_independent():
    from tdlib.organism.traces import OrganismTraces
    from tdlib.models import load_tokenizer
    from tdlib.pairs import resolve_pair

    data = OrganismTraces(load_tokenizer(resolve_pair("smoke").target), "smoke", batch_size=1, seed=0)
    low, high = data.config.min_terms, data.config.max_terms
    n_layers = high - low + 1  # cut range 1..n_layers as wide as the first problem's length range
    config = TrainConfig(seed=0)
    steps = range(300)
    first_lengths = [data.problems(step)[0].n_terms for step in steps]
    cuts = [cut_for_step(config, n_layers, step) for step in steps]
    # the old shared seed: the cut was a function of the first problem's length (here: exactly its offset)
    shared = [random.Random(config.seed * 1_000_003 + step).randint(1, n_layers) for step in steps]
    assert len(set(zip(first_lengths, shared))) == len(set(first_lengths))
    # now every length occurs with several cuts, and cut and length agree about as often as chance (1 / n_layers)
    pairs = Counter(zip(first_lengths, cuts))
    for length in set(first_lengths):
        assert len({cut for (l, cut) in pairs if l == length}) > 1
    agreement = sum(c == l - low + 1 for c, l in zip(cuts, first_lengths)) / len(cuts)
    assert agreement < 2 / n_layers
    assert set(cuts) == set(range(1, n_layers + 1))
    assert [cut_for_step(config, n_layers, s) for s in steps] == cuts  # a function of the step (resumable)
    assert cut_for_step(dataclasses.replace(config, min_cut=0), 3, 0) in range(0, 4)
