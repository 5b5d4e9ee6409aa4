"""Scoring the method against the organism's planted mechanisms (docs/method.md, "Beyond the paper").

The paper could not check its hesitation features against a known mechanism. On the organism we wrote them
(``tdlib.organism.mechanisms`` is the answer key): every step of a reference trace ends with a ``;`` token, and the
prediction made there is where a mechanism fires or not: those are the *decision positions*, labelled by the
mechanism that fires (``crossing``, ``repeat``, ``slip``) or none. On them we measure

* **detection**: how well each hesitation feature's activation (and the set's summed activation) separates positions
  where the rule fires from those where it does not: AUROC, and precision / recall of "the feature is active";
  as a reference, a logistic-regression probe on *all* adapter features at the same positions, fitted on one half of
  the problems and scored on the other (features are scored on that same held-out half);
* **ablation** (teacher-forced on the same traces): with the hesitation features set to zero, how often the adapter
  model still predicts the hesitation token where the rule fires, and how much its predictions change elsewhere in
  the response (top-1 agreement with the unablated model and KL to it).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..data import pad_batch
from ..models import anatomy
from ..metrics import kl_from_log_probs
from . import mechanisms, task
from .. import attribution as A
from ..attribution.hesitation import cut_at_token, hesitation_token
from ..generate import generate_greedy
from ..residual import capture_features
from ..runs import load_named
from ..steer import FeatureSet, ablate_features, features_by_layer
from ..sweep import seed_variant
from .build import eval_problems, get_config
from .mechanisms import DISTRACTOR, MECHANISMS


@dataclass
class DecisionPositions:
    """Teacher-forced reference traces and the positions where the hesitation mechanisms decide."""

    batches: list[dict]
    """Right-padded ``input_ids`` / ``attention_mask`` of prompt + reasoning trace + EOS."""
    decisions: list[torch.Tensor]
    """Per batch, [n, 2] (row, position) of every step-closing ``;``: where the model decides whether to hesitate."""
    fires: list[torch.Tensor]
    """Per batch, [n] bool: a hesitation mechanism fires there (the trace hesitates next)."""
    response: list[torch.Tensor]
    """Per batch, [batch, seq] bool: positions that predict a response token or the EOS (the scored text)."""
    problem_index: list[torch.Tensor]
    """Per batch, [n] index of the problem each decision position belongs to."""
    mechanisms: list[list[str | None]] = None
    """Per batch, the mechanism of each decision (``tdlib.organism.mechanisms``; None: no trigger)."""
    answers: list[torch.Tensor] = None
    """Per batch, [n, 2] (row, position) of each answer's last digit: where the distractor (the period) decides."""


def decision_positions(tokenizer, problems: list[task.Problem], batch_size: int = 50) -> DecisionPositions:
    """Tokenise the target's reference traces of ``problems`` and place every decision point of the answer key."""
    out = DecisionPositions([], [], [], [], [], [], [])
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        sequences, placed_all, prompt_lengths = [], [], []
        for problem in chunk:
            ids, placed = mechanisms.token_decisions(tokenizer, problem.prompt + task.reasoning_trace(problem),
                                                     len(problem.prompt))
            prompt_ids = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
            sequences.append(ids + [tokenizer.eos_token_id])
            placed_all.append(placed)
            prompt_lengths.append(len(prompt_ids))
        batch = pad_batch(tokenizer, sequences)
        rows, positions, fires, owners, labels, answers = [], [], [], [], [], []
        response = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        for row, (ids, placed, prompt_length) in enumerate(zip(sequences, placed_all, prompt_lengths)):
            response[row, prompt_length - 1:len(ids) - 1] = True
            for index, decision in placed:
                if decision.mechanism == mechanisms.DISTRACTOR:
                    answers.append((row, index))
                    continue
                rows.append(row)
                positions.append(index)
                fires.append(decision.mechanism is not None)
                owners.append(start + row)
                labels.append(decision.mechanism)
        out.batches.append(batch)
        out.decisions.append(torch.tensor(list(zip(rows, positions)), dtype=torch.long).reshape(-1, 2))
        out.fires.append(torch.tensor(fires, dtype=torch.bool))
        out.response.append(response)
        out.problem_index.append(torch.tensor(owners, dtype=torch.long))
        out.mechanisms.append(labels)
        out.answers.append(torch.tensor(answers, dtype=torch.long).reshape(-1, 2))
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
    x, columns = _adapter_matrix(model, positions)
    labels = torch.cat(positions.fires).numpy()
    owners = torch.cat(positions.problem_index).numpy()
    return x[:len(labels)], labels, owners, columns


def fit_probe(x: torch.Tensor, y: np.ndarray, l2: float = 1e-3, steps: int = 200) -> torch.nn.Linear:
    """A logistic-regression probe (standardised inputs folded into the weights), fitted with L-BFGS from zero (the
    loss is convex, and a random start would make the fit depend on whatever drew random numbers before it)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    target = torch.tensor(y, dtype=torch.float32)
    probe = torch.nn.Linear(x.shape[1], 1)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
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


# ------------------------------------------------------------------ the benchmark: every mechanism, with baselines

@torch.no_grad()
def mlp_activations(model, positions: DecisionPositions) -> torch.Tensor:
    """The MLP hidden activations (the input of every layer's ``down_proj``; in a spliced model, of the MLP that
    runs: the base's in the hybrid) at each decision point and answer end: [n decisions + n answers, layers x
    width], decisions first, in ``decision_activations``' order."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(anatomy(model).n_layers):
        mlp = anatomy(model).mlp(layer)
        mlp = getattr(mlp, "base_mlp", mlp)  # a spliced layer: the base MLP is the one the hybrid runs
        handles.append(mlp.down_proj.register_forward_pre_hook(
            lambda module, args, layer=layer: captured.__setitem__(layer, args[0])))
    rows, answers = [], []
    try:
        for batch, decisions, ends in zip(positions.batches, positions.decisions, positions.answers):
            captured.clear()
            model(**batch)
            layers = sorted(captured)
            rows.append(torch.cat([captured[l][decisions[:, 0], decisions[:, 1]] for l in layers], -1))
            answers.append(torch.cat([captured[l][ends[:, 0], ends[:, 1]] for l in layers], -1))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat([torch.cat(rows), torch.cat(answers)]).float()


@torch.no_grad()
def _adapter_matrix(model, positions: DecisionPositions) -> tuple[torch.Tensor, list]:
    rows, answers, columns = [], [], None
    for batch, decisions, ends in zip(positions.batches, positions.decisions, positions.answers):
        with capture_features(model) as features:
            model(**batch)
        layers = sorted(features)
        columns = [(layer, f) for layer in layers for f in range(features[layer].shape[-1])]
        rows.append(torch.cat([features[l][decisions[:, 0], decisions[:, 1]] for l in layers], -1))
        answers.append(torch.cat([features[l][ends[:, 0], ends[:, 1]] for l in layers], -1))
    return torch.cat([torch.cat(rows), torch.cat(answers)]).float(), columns


def answer_key(positions: DecisionPositions) -> dict[str, np.ndarray]:
    """Per mechanism, the rows (decisions then answer ends, as ``mlp_activations``) it labels positive, and the rows
    it is scored on: hesitation mechanisms on the ``;`` decisions, the distractor on decisions + answer ends."""
    labels = [m for batch in positions.mechanisms for m in batch]
    n_answers = sum(len(a) for a in positions.answers)
    decision = np.array([True] * len(labels) + [False] * n_answers)
    mechanism = np.array(labels + [DISTRACTOR] * n_answers, dtype=object)
    key = {m: {"positive": mechanism == m, "universe": decision} for m in MECHANISMS}
    key["hesitation"] = {"positive": np.isin(mechanism, MECHANISMS), "universe": decision}
    key[DISTRACTOR] = {"positive": mechanism == DISTRACTOR, "universe": np.ones(len(mechanism), bool)}
    return key


def _set_score(x: torch.Tensor, columns: list[int], fit: np.ndarray) -> np.ndarray:
    scale = x[fit][:, columns].amax(0).clamp_min(1e-6)
    return (x[:, columns] / scale).sum(-1).numpy()


def _detector(score: np.ndarray, labels: np.ndarray, test: np.ndarray, threshold: float = 0.0) -> dict:
    precision, recall = precision_recall(score[test] > threshold, labels[test])
    return {"auroc": auroc(score[test], labels[test]), "precision": precision, "recall": recall}


def _probe_detector(x: torch.Tensor, labels: np.ndarray, fit: np.ndarray, test: np.ndarray) -> dict:
    if labels[fit].all() or not labels[fit].any():
        return {"auroc": float("nan"), "precision": None, "recall": None}
    probe = fit_probe(x[fit], labels[fit])
    with torch.no_grad():
        score = probe(x).squeeze(-1).numpy()
    return _detector(score, labels, test)


def mechanism_benchmark(adapter_model, base, hybrid, tokenizer, problems: list[task.Problem],
                        sets: dict[str, FeatureSet], seed: int = 0, n_random: int = 5, batch_size: int = 50) -> dict:
    """Score each mechanism's selected feature set against the answer key on the reference traces of ``problems``
    (held-out half of the problems), beside baselines on the same positions: random live feature sets of the same
    size (``n_random`` draws), and logistic probes on all adapter features, on the base's MLP activations and on the
    hybrid's (a method that does not diff). Sets are keyed by mechanism (``crossing``, ``repeat``, ``slip``,
    ``hesitation`` for the union of the three, ``period``); each is also scored on every other mechanism (how
    specific it is)."""
    positions = decision_positions(tokenizer, problems, batch_size)
    x, columns = _adapter_matrix(adapter_model, positions)
    inputs = {"adapter features": x, "base MLP": mlp_activations(base, positions),
              "hybrid MLP": mlp_activations(hybrid, positions)}
    owners = _problem_owners(positions)
    rng = np.random.default_rng(seed)
    problem_ids = np.unique(owners)
    fit_problems = set(rng.choice(problem_ids, size=len(problem_ids) // 2, replace=False).tolist())
    fit_all = np.array([o in fit_problems for o in owners])
    index = {column: i for i, column in enumerate(columns)}
    live = np.flatnonzero((x > 0).any(0).numpy())
    key = answer_key(positions)
    board = {}
    for mechanism, rule in key.items():
        universe = rule["universe"]
        labels, fit = rule["positive"][universe], fit_all[universe]
        test = ~fit
        row = {"n_points": int(universe.sum()), "n_positive": int(labels.sum()),
               "n_test_positive": int(labels[test].sum())}
        xu = {name: value[torch.from_numpy(universe)] for name, value in inputs.items()}
        chosen = sets.get(mechanism)
        if chosen:
            chosen_columns = [index[(layer, f)] for layer, fs in sorted(chosen.items()) for f in fs]
            row["n_features"] = len(chosen_columns)
            row["set"] = _detector(_set_score(xu["adapter features"], chosen_columns, fit), labels, test)
            fit_auroc = [auroc(xu["adapter features"][fit][:, c].numpy(), labels[fit]) for c in chosen_columns]
            best = chosen_columns[int(np.nanargmax(fit_auroc))] if not np.all(np.isnan(fit_auroc)) else chosen_columns[0]
            row["best_feature"] = {"layer": columns[best][0], "feature": columns[best][1],
                                   **_detector(xu["adapter features"][:, best].numpy(), labels, test)}
            draws = []
            for _ in range(n_random):
                picked = rng.choice(live, size=min(len(chosen_columns), len(live)), replace=False).tolist()
                draws.append(_detector(_set_score(xu["adapter features"], picked, fit), labels, test)["auroc"])
            row["random_set"] = {"auroc_mean": float(np.nanmean(draws)), "auroc_draws": draws}
            row["set_on_other_mechanisms"] = {
                other: auroc(_set_score(inputs["adapter features"][torch.from_numpy(r["universe"])], chosen_columns,
                                        fit_all[r["universe"]])[~fit_all[r["universe"]]],
                             r["positive"][r["universe"]][~fit_all[r["universe"]]])
                for other, r in key.items() if other != mechanism}
        row["probes"] = {name: _probe_detector(value, labels, fit, test) for name, value in xu.items()}
        board[mechanism] = row
    overlaps = {}
    names = [n for n in sets if sets[n]]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa = {(l, f) for l, fs in sets[a].items() for f in fs}
            sb = {(l, f) for l, fs in sets[b].items() for f in fs}
            overlaps[f"{a} & {b}"] = {"shared": len(sa & sb), "jaccard": len(sa & sb) / max(len(sa | sb), 1)}
    return {"n_problems": len(problems), "n_test_problems": len(problem_ids) - len(fit_problems), "scores": board,
            "overlap": overlaps, "n_live_features": int(len(live)), "n_features_total": len(columns),
            "probe": "logistic regression on the inputs named, fitted on half the problems, scored on the other"}


def _problem_owners(positions: DecisionPositions) -> np.ndarray:
    """The problem each benchmark row belongs to (decisions, then answer ends)."""
    decisions = torch.cat(positions.problem_index).numpy()
    answers, offset = [], 0
    for batch, ends in zip(positions.batches, positions.answers):
        answers.extend((offset + ends[:, 0]).tolist())
        offset += len(batch["input_ids"])
    return np.concatenate([decisions, np.array(answers, dtype=int)])


# ------------------------------------------------------------------ per-mechanism prompts and feature sets

def mechanism_prompts(target, tokenizer, problems: list[task.Problem], per_mechanism: int, max_new_tokens: int,
                      batch_size: int = 64, progress: bool = True) -> dict[str, list]:
    """The target's greedy rollouts of ``problems`` cut before every hesitation, grouped by the mechanism whose
    decision point the cut ends at (``tdlib.organism.mechanisms.last_decision``), and cut before the answer's
    period (the distractor): at most ``per_mechanism`` prompts each, topped up from the reference traces when the
    rollouts show a mechanism too rarely (``source`` "trace"). Keys: the mechanisms, ``period``, and
    ``unexplained`` (hesitations at a point with no trigger)."""
    wait = hesitation_token(tokenizer, " " + task.HESITATION)
    period = hesitation_token(tokenizer, task.DISTRACTOR)
    found: dict[str, list] = {m: [] for m in (*mechanisms.MECHANISMS, mechanisms.DISTRACTOR, "unexplained")}
    generation = generate_greedy(target, tokenizer, [p.prompt for p in problems], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, progress=progress, desc="target rollouts")

    def collect(responses, source):
        for index, (problem, response) in enumerate(zip(problems, responses)):
            for cut in cut_at_token(tokenizer, problem.prompt, response, wait, index, max_cuts=10, source=source):
                text = tokenizer.decode(cut.input_ids)
                label = mechanisms.last_decision(text, len(problem.prompt)) or "unexplained"
                if len(found[label]) < per_mechanism:
                    found[label].append(cut)
            cuts = cut_at_token(tokenizer, problem.prompt, response, period, index, max_cuts=1, source=source)
            if cuts and len(found[mechanisms.DISTRACTOR]) < per_mechanism:
                found[mechanisms.DISTRACTOR].append(cuts[0])

    collect(generation.responses, "rollout")
    if any(len(found[m]) < per_mechanism for m in (*mechanisms.MECHANISMS, mechanisms.DISTRACTOR)):
        # a target that rarely shows a mechanism within these problems (the tiny smoke organism): the rest from the
        # reference traces, recorded as source "trace"
        collect([task.reasoning_trace(p) for p in problems], "trace")
    return found


def jaccard(a: list[dict], b: list[dict]) -> float:
    """Jaccard overlap of two feature lists (dicts with ``layer`` and ``feature``)."""
    sa = {(f["layer"], f["feature"]) for f in a}
    sb = {(f["layer"], f["feature"]) for f in b}
    return len(sa & sb) / len(sa | sb) if sa | sb else float("nan")


def answer_key_study(pair, adapter_model, target, tokenizer, *, study: dict, mode_study: dict, prompts: list,
                     selection_prompts: list, n_searched: int, wait: int, settings, n_truth_problems: int,
                     n_mechanism_prompts: int, max_new_tokens: int, model_name: str, stability_seed: int | None,
                     train_root=None, progress=print) -> dict:
    """Notebook 05 on the organism: the selected hesitation features (``study``) scored against the answer key on
    the last ``n_truth_problems`` held-out problems (``score_against_rule``); a study per planted mechanism on
    prompts cut at its decision points (``settings``: the study's ``StudyConfig``, here in the selected mode and
    without the intervention check) and every set scored with
    baselines (``mechanism_benchmark``); with ``stability_seed``, the same for the analysis adapter retrained with
    that seed (Jaccard overlap and AUROC of each set). ``mode_study``: the selected mode's own study (the like-for-like
    set the seeds are compared on). Returns the entries of ``05_attribution.json`` these fill."""
    settings = replace(settings, mode=study["mode"], n_check_features=0)
    problems = eval_problems(get_config(pair.name))
    n_truth = min(n_truth_problems, len(problems) // 2)  # the tiny smoke organism has 32 problems
    truth_problems, selection_problems = problems[-n_truth:], problems[:len(problems) - n_truth]
    overlaps = n_searched > len(selection_problems)
    if overlaps:
        progress(f"note: the study's {n_searched} rollout problems overlap the {n_truth} scored ones")
    truth = score_against_rule(adapter_model, tokenizer, truth_problems, features_by_layer(study["features"]))

    by_mechanism = mechanism_prompts(target, tokenizer, selection_problems, n_mechanism_prompts, max_new_tokens)
    sources = {m: dict(Counter(p.source for p in ps)) for m, ps in by_mechanism.items()}
    progress(f"prompts per mechanism: {sources}")
    period = A.hesitation_token(tokenizer, ".")

    def mechanism_sets(model):
        found = {m: A.hesitation_study(model, tokenizer, p, period if m == DISTRACTOR else wait, settings)
                 for m, p in by_mechanism.items() if p and m != "unexplained"}
        return found, {"hesitation": features_by_layer(study["features"]) if model is adapter_model else None,
                       **{m: features_by_layer(s["features"]) for m, s in found.items()}}

    base_model, hybrid_model = load_named(pair, "base"), load_named(pair, "hybrid")
    studies, sets = mechanism_sets(adapter_model)
    benchmark = mechanism_benchmark(adapter_model, base_model, hybrid_model, tokenizer, truth_problems, sets)
    stability = None
    if stability_seed is not None:
        second_name, second_model = seed_variant(pair, model_name, stability_seed, train_root)
        second_hesitation = A.hesitation_study(second_model, tokenizer, prompts, wait, settings,
                                               select_on=selection_prompts)
        second_studies, second_sets = mechanism_sets(second_model)
        second_sets["hesitation"] = features_by_layer(second_hesitation["features"])
        second_scores = mechanism_benchmark(second_model, base_model, hybrid_model, tokenizer, truth_problems,
                                            second_sets)
        first = {"hesitation": mode_study["features"], **{m: s["features"] for m, s in studies.items()}}
        second = {"hesitation": second_hesitation["features"], **{m: s["features"] for m, s in second_studies.items()}}
        stability = {"seed_model": second_name, **{
            m: {"jaccard": jaccard(first[m], second[m]), "n_features": [len(first[m]), len(second[m])],
                "set_auroc": [benchmark["scores"][m].get("set", {}).get("auroc"),
                              second_scores["scores"][m].get("set", {}).get("auroc")]}
            for m in first if m in second}}
    return {"ground_truth": truth, "benchmark": benchmark, "mechanism_studies": studies,
            "mechanism_prompts": sources, "stability": stability, "selection_overlaps_scoring": overlaps}
