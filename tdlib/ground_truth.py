"""Scoring the method against the organism's known hesitation rule (docs/method.md, "Beyond the paper").

The paper could not check its hesitation features against a known mechanism. On the organism we wrote the rule:
the target says ``wait`` after a step whose running total crosses below zero. Every step of a reference trace
ends with a ``;`` token, and the prediction made there is where the rule fires or not: those are the *decision
positions*, labelled 1 when the next token is the hesitation token. On them we measure

* **detection**: how well each hesitation feature's activation (and the set's summed activation) separates positions
  where the rule fires from those where it does not: AUROC, and precision / recall of "the feature is active";
  as a reference, a logistic-regression probe on *all* adapter features at the same positions, fitted on one half of
  the problems and scored on the other (features are scored on that same held-out half);
* **ablation** (teacher-forced on the same traces): with the hesitation features set to zero, how often the adapter
  model still predicts the hesitation token where the rule fires, and how much its predictions change elsewhere in
  the response (top-1 agreement with the unablated model and KL to it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import pad_batch
from .metrics import kl_from_log_probs
from .organism import task
from .residual import capture_features
from .steer import FeatureSet, ablate_features


@dataclass
class DecisionPositions:
    """Teacher-forced reference traces and the positions where the hesitation rule decides."""

    batches: list[dict]
    """Right-padded ``input_ids`` / ``attention_mask`` of prompt + reasoning trace + EOS."""
    decisions: list[torch.Tensor]
    """Per batch, [n, 2] (row, position) of every step-closing ``;``: where the model decides whether to hesitate."""
    fires: list[torch.Tensor]
    """Per batch, [n] bool: the rule fires there (the next token is the hesitation token)."""
    response: list[torch.Tensor]
    """Per batch, [batch, seq] bool: positions that predict a response token or the EOS (the scored text)."""
    problem_index: list[torch.Tensor]
    """Per batch, [n] index of the problem each decision position belongs to."""


def decision_positions(tokenizer, problems: list[task.Problem], batch_size: int = 50) -> DecisionPositions:
    """Tokenise the target's reference traces of ``problems`` and locate the step-closing ``;`` tokens."""
    from .autointerp.segments import SEGMENT_ID, token_segments

    wait_ids = tokenizer(" " + task.HESITATION, add_special_tokens=False)["input_ids"]
    if len(wait_ids) != 1:
        raise ValueError(f"the hesitation word must be one token, got {wait_ids}")
    semicolon = tokenizer(";", add_special_tokens=False)["input_ids"]
    out = DecisionPositions([], [], [], [], [])
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        sequences, segments, prompt_lengths = [], [], []
        for problem in chunk:
            ids, labels = token_segments(tokenizer, problem)
            sequences.append(ids)
            segments.append(labels)
            prompt_lengths.append(labels.count(SEGMENT_ID["prompt"]))
        batch = pad_batch(tokenizer, sequences)
        rows, positions, fires, owners = [], [], [], []
        response = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        for row, (ids, labels, prompt_length) in enumerate(zip(sequences, segments, prompt_lengths)):
            response[row, prompt_length - 1:len(ids) - 1] = True
            for t in range(prompt_length, len(ids) - 1):
                if ids[t] == semicolon[0] and labels[t] == SEGMENT_ID["step"]:
                    rows.append(row)
                    positions.append(t)
                    fires.append(ids[t + 1] == wait_ids[0])
                    owners.append(start + row)
        out.batches.append(batch)
        out.decisions.append(torch.tensor(list(zip(rows, positions)), dtype=torch.long).reshape(-1, 2))
        out.fires.append(torch.tensor(fires, dtype=torch.bool))
        out.response.append(response)
        out.problem_index.append(torch.tensor(owners, dtype=torch.long))
    return out


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half); NaN without both classes."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_recall(active: np.ndarray, labels: np.ndarray) -> tuple[float | None, float | None]:
    """Precision and recall of "active" as a detector of ``labels`` (None where undefined)."""
    active, labels = np.asarray(active, bool), np.asarray(labels, bool)
    hits = (active & labels).sum()
    precision = hits / active.sum() if active.sum() else None
    recall = hits / labels.sum() if labels.sum() else None
    return (None if precision is None else float(precision), None if recall is None else float(recall))


@torch.no_grad()
def decision_activations(model, positions: DecisionPositions) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list]:
    """Every adapter feature's activation at each decision position: ([n, layers x features], labels, problem ids,
    [(layer, feature)] column names)."""
    rows, columns = [], None
    for batch, decisions in zip(positions.batches, positions.decisions):
        with capture_features(model) as features:
            model(**batch)
        layers = sorted(features)
        columns = [(layer, f) for layer in layers for f in range(features[layer].shape[-1])]
        rows.append(torch.cat([features[layer][decisions[:, 0], decisions[:, 1]] for layer in layers], dim=-1))
    labels = torch.cat(positions.fires).numpy()
    owners = torch.cat(positions.problem_index).numpy()
    return torch.cat(rows).float(), labels, owners, columns


def fit_probe(x: torch.Tensor, y: np.ndarray, l2: float = 1e-3, steps: int = 200) -> torch.nn.Linear:
    """A logistic-regression probe (standardised inputs folded into the weights), fitted with L-BFGS."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    target = torch.tensor(y, dtype=torch.float32)
    probe = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(probe(z).squeeze(-1), target) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        probe.weight /= std
        probe.bias -= (probe.weight * mean).sum()
    return probe


def detection_scores(model, positions: DecisionPositions, features: FeatureSet, seed: int = 0) -> dict:
    """Per-feature and set detection of the rule's firing positions, beside a probe on all adapter features."""
    x, labels, owners, columns = decision_activations(model, positions)
    problems = np.unique(owners)
    rng = np.random.default_rng(seed)
    fit_problems = set(rng.choice(problems, size=len(problems) // 2, replace=False).tolist())
    fit = np.array([o in fit_problems for o in owners])
    test = ~fit
    index = {column: i for i, column in enumerate(columns)}
    chosen = [(layer, f) for layer, fs in sorted(features.items()) for f in fs]
    per_feature = []
    for layer, feature in chosen:
        acts = x[:, index[(layer, feature)]].numpy()
        precision, recall = precision_recall(acts[test] > 0, labels[test])
        per_feature.append({"layer": layer, "feature": feature, "auroc": auroc(acts[test], labels[test]),
                            "precision": precision, "recall": recall})
    chosen_columns = [index[c] for c in chosen]
    # the set's score: each feature scaled by its largest activation on the fitting half, then summed
    scale = x[fit][:, chosen_columns].amax(0).clamp_min(1e-6)
    set_score = (x[:, chosen_columns] / scale).sum(-1).numpy()
    set_precision, set_recall = precision_recall(set_score[test] > 0, labels[test])
    probe = fit_probe(x[fit], labels[fit])
    with torch.no_grad():
        probe_score = probe(x[test]).squeeze(-1).numpy()
    probe_precision, probe_recall = precision_recall(probe_score > 0, labels[test])
    return {
        "n_decisions": int(len(labels)), "n_fires": int(labels.sum()), "n_test_decisions": int(test.sum()),
        "per_feature": per_feature,
        "set": {"auroc": auroc(set_score[test], labels[test]), "precision": set_precision, "recall": set_recall,
                "n_features": len(chosen)},
        "probe": {"auroc": auroc(probe_score, labels[test]), "precision": probe_precision, "recall": probe_recall,
                  "inputs": f"all {x.shape[1]} adapter features, logistic regression fitted on half the problems"},
    }


@torch.no_grad()
def ablation_scores(model, positions: DecisionPositions, features: FeatureSet, wait_id: int) -> dict:
    """Teacher-forced effect of ablating ``features``: hesitation where the rule fires, and the rest of the response."""
    sums = {"wait_top1_before": 0, "wait_top1_after": 0, "p_wait_before": 0.0, "p_wait_after": 0.0,
            "other_agree": 0, "other_kl": 0.0, "other": 0, "fires": 0}
    for batch, decisions, fires, response in zip(positions.batches, positions.decisions, positions.fires,
                                                 positions.response):
        before = F.log_softmax(model(**batch).logits.float(), -1)
        with ablate_features(model, features):
            after = F.log_softmax(model(**batch).logits.float(), -1)
        rows, cols = decisions[fires, 0], decisions[fires, 1]
        sums["fires"] += int(fires.sum())
        sums["wait_top1_before"] += int((before[rows, cols].argmax(-1) == wait_id).sum())
        sums["wait_top1_after"] += int((after[rows, cols].argmax(-1) == wait_id).sum())
        sums["p_wait_before"] += float(before[rows, cols, wait_id].exp().sum())
        sums["p_wait_after"] += float(after[rows, cols, wait_id].exp().sum())
        other = response.clone()
        other[rows, cols] = False
        sums["other"] += int(other.sum())
        sums["other_agree"] += int((before.argmax(-1) == after.argmax(-1))[other].sum())
        sums["other_kl"] += float(kl_from_log_probs(before, after)[other].sum())
    fires, other = max(sums["fires"], 1), max(sums["other"], 1)
    return {
        "n_fires": sums["fires"], "n_other_positions": sums["other"],
        "wait_top1_where_rule_fires": {"before": sums["wait_top1_before"] / fires, "after": sums["wait_top1_after"] / fires},
        "p_wait_where_rule_fires": {"before": sums["p_wait_before"] / fires, "after": sums["p_wait_after"] / fires},
        "top1_agreement_elsewhere": sums["other_agree"] / other,
        "kl_elsewhere": sums["other_kl"] / other,
    }


def score_against_rule(model, tokenizer, problems: list[task.Problem], features: FeatureSet, seed: int = 0,
                       batch_size: int = 50) -> dict:
    """Notebook 05's ground-truth score of the hesitation features (see the module docstring)."""
    positions = decision_positions(tokenizer, problems, batch_size)
    wait_id = tokenizer(" " + task.HESITATION, add_special_tokens=False)["input_ids"][0]
    return {"n_problems": len(problems), **detection_scores(model, positions, features, seed),
            "ablation": ablation_scores(model, positions, features, wait_id)}
