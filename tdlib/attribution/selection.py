"""Which ranking chooses the hesitation features: decided on one half of the prompts, tested on the other.

A study's graphs rank features by what removing them should do to the hesitation logit. Whether a ranking is any
good is a question about the model, so it is answered by removals in the real model, on prompts the ranking was not
made on:

* the prompts are split by problem (``split_by_problem``): the **selection** half makes every ranking, the
  **evaluation** half only tests them;
* a pool of candidates (``candidate_pool``: each mode's most influential features on the selection half) is removed
  one feature at a time, at every position outside the shared prefix, on every prompt (``feature_removals``);
* each rule scores the pool from the selection half (``rule_scores``): a graph mode by its graphs' predicted change
  (minus the features' total effects), **gradient** by gradient x activation through the real model with nothing
  frozen (``gradient_evidence``: one backward pass per prompt; the first-order prediction of a removal, no graph),
  and **verified** by the measured change itself (the graphs propose, the model decides);
* the rule is chosen by a two-fold cross-fit inside the selection half (``compare_rules``), so the evaluation half
  never informs the choice, and the chosen rule's agreement on the evaluation half is the held-out number: the rank
  correlation, within each evaluation prompt, between the rule's scores and the real changes.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..models import anatomy, unwrap
from ..splice import mlp_choice
from .hesitation import summarize_evidence
from .interventions import rank_correlation, two_scale_agreement
from .replay import check_mode

VERIFIED = "verified"
"""The rule that ranks candidates by their measured removal effect on the selection prompts."""
GRADIENT = "gradient"
"""The rule that ranks features by gradient x activation through the real model, nothing frozen."""


def study_modes(compare_modes, selection_rule: str | None = None) -> list[str]:
    """The modes a study compares (``compare_modes`` checked, repeats dropped, order kept); ``selection_rule``
    must be None (chosen on held-out prompts), ``VERIFIED`` or one of them."""
    modes = [check_mode(name) for name in dict.fromkeys(compare_modes)]
    if selection_rule is not None and selection_rule not in (*modes, VERIFIED):
        raise ValueError(f"selection_rule {selection_rule!r} must be None, {VERIFIED!r} or one of compare_modes {modes}")
    return modes


def _problem_key(prompt) -> tuple[str, int]:
    return prompt.source, prompt.problem_index


def split_by_problem(prompts) -> tuple[list[int], list[int]]:
    """(selection, evaluation) prompt numbers: the first half of the problems (in order of appearance, rounded up)
    selects, the rest evaluates, so no rollout sits in both. With a single problem there is nothing to hold out:
    every prompt selects and the evaluation half is empty."""
    problems = list(dict.fromkeys(_problem_key(p) for p in prompts))
    first = set(problems[:(len(problems) + 1) // 2]) if len(problems) > 1 else set(problems)
    selection = [i for i, p in enumerate(prompts) if _problem_key(p) in first]
    return selection, [i for i in range(len(prompts)) if i not in set(selection)]


def candidate_pool(evidences: dict, n_candidates: int) -> list[tuple[int, int]]:
    """Each rule's ``n_candidates`` top features on its selection prompts (``top_features``: a mode's by influence,
    the gradient's by predicted change), in one list, first seen first."""
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    return list(dict.fromkeys(key for evidence in evidences.values() for key in evidence.top_features(n_candidates)))


class GradientEvidence:
    """Gradient x activation of every active adapter feature through the real model (nothing frozen: attention
    patterns, norms, base MLPs and ReLUs all respond), per prompt: the first-order prediction of removing it."""

    def __init__(self, node_predictions: list[dict], select_on: list[int]):
        self.node_predictions = node_predictions
        """Per prompt: {(layer, position, feature): predicted change of the logit when that node is removed}."""
        self.select_on = select_on
        self.feature_predictions = [_by_feature(nodes) for nodes in node_predictions]
        """Per prompt: {(layer, feature): the predicted change when it is removed at every position}."""

    def top_features(self, n: int) -> list[tuple[int, int]]:
        totals: dict[tuple[int, int], float] = {}
        for number in self.select_on:
            for key, value in self.feature_predictions[number].items():
                totals[key] = totals.get(key, 0.0) + abs(value)
        return sorted((k for k in totals if totals[k] > 0), key=lambda k: -totals[k])[:n]

    def annotate(self, records: list[dict]) -> list[dict]:
        """Intervention records (with their ``prompt``) with this rule's prediction for the same node added."""
        return [{**r, "predicted_gradient": self.node_predictions[r["prompt"]].get(
            (r["layer"], r["position"], r["feature"]), 0.0)} for r in records]


def _by_feature(nodes: dict) -> dict:
    found: dict[tuple[int, int], float] = {}
    for (layer, _, feature), value in nodes.items():
        found[(layer, feature)] = found.get((layer, feature), 0.0) + value
    return found


def gradient_evidence(model, prompts, token: int, prefix: int = 0, select_on=None, demean: bool = True,
                      progress: bool = True) -> GradientEvidence:
    """``GradientEvidence`` of every prompt: one forward and one backward pass of the real adapter model, each
    layer's feature activations made leaves, the (demeaned) ``token`` logit at the last position differentiated;
    positions before ``prefix`` left out."""
    inner = unwrap(model)
    device = next(inner.parameters()).device
    predictions = []
    with mlp_choice(inner, "adapter"):
        for prompt in tqdm(prompts, desc="gradient x activation", disable=not progress):
            leaves, activations, handles = {}, {}, []
            for layer in range(anatomy(inner).n_layers):
                def leaf(module, args, output, layer=layer):
                    # a zero added to the activations: its gradient is the activation's, with every later feature
                    # still following it (total effects, not direct ones)
                    activations[layer] = output.detach()
                    leaves[layer] = torch.zeros_like(output, requires_grad=True)
                    return output + leaves[layer]
                handles.append(anatomy(inner).mlp(layer).adapter.features.register_forward_hook(leaf))
            try:
                with torch.enable_grad():
                    ids = torch.as_tensor(prompt.input_ids, device=device)[None]
                    logit = _hesitation_logit(inner, ids, token, demean)[0]
                    layers = sorted(leaves)
                    grads = torch.autograd.grad(logit, [leaves[l] for l in layers])
            finally:
                for handle in handles:
                    handle.remove()
            nodes = {}
            for layer, grad in zip(layers, grads):
                acts = activations[layer][0]
                positions, features = (acts[prefix:] > 0).nonzero(as_tuple=True)
                effects = -(grad[0, prefix:] * acts[prefix:])[positions, features]
                for pos, feature, effect in zip((positions + prefix).tolist(), features.tolist(), effects.tolist()):
                    nodes[(layer, pos, feature)] = effect
            predictions.append(nodes)
    select_on = list(range(len(prompts))) if select_on is None else sorted(set(select_on))
    return GradientEvidence(predictions, select_on)


def _hesitation_logit(model, ids: torch.Tensor, token: int, demean: bool) -> torch.Tensor:
    logits = model(ids, use_cache=False).logits[:, -1].double()
    return logits[:, token] - (logits.mean(-1) if demean else 0)


def _feature_activations(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's adapter feature activations [P, F] on one prompt ``ids`` [1, P]."""
    captured, handles = {}, []
    for layer in range(anatomy(model).n_layers):
        def keep(module, args, output, layer=layer):
            captured[layer] = output[0].detach()
        handles.append(anatomy(model).mlp(layer).adapter.features.register_forward_hook(keep))
    try:
        model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[layer] for layer in sorted(captured)]


def _zeroing_features(model, rows_by_layer: dict[int, tuple[list[int], list[int]]], start: int):
    """Hooks that zero feature ``ids[k]`` of ``layer`` in batch row ``rows[k]``, at positions >= ``start``."""
    handles = []
    for layer, (rows, ids) in rows_by_layer.items():
        def zero(module, args, output, rows=rows, ids=ids):
            output = output.clone()
            device = output.device
            output[torch.tensor(rows, device=device)[:, None], torch.arange(start, output.shape[1], device=device)[None],
                   torch.tensor(ids, device=device)[:, None]] = 0.0
            return output
        handles.append(anatomy(model).mlp(layer).adapter.features.register_forward_hook(zero))
    return handles


@torch.no_grad()
def feature_removals(model, prompts, pool: list[tuple[int, int]], token: int, demean: bool = True, prefix: int = 0,
                     batch_size: int = 16, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """([n_prompts, n_pool] the real adapter model's change of the (demeaned) ``token`` logit at the last position
    when one pool feature is zeroed at every position from ``prefix`` on, [n_prompts, n_pool] whether the feature
    fires there at all). A feature that does not fire is not run: its change is 0."""
    inner = unwrap(model)
    device = next(inner.parameters()).device
    measured = torch.zeros(len(prompts), len(pool), dtype=torch.float64)
    active = torch.zeros(len(prompts), len(pool), dtype=torch.bool)
    with mlp_choice(inner, "adapter"):
        for number, prompt in enumerate(tqdm(prompts, desc="feature removals", disable=not progress)):
            ids = torch.as_tensor(prompt.input_ids, device=device)[None]
            acts = _feature_activations(inner, ids)
            for column, (layer, feature) in enumerate(pool):
                active[number, column] = bool((acts[layer][prefix:, feature] > 0).any())
            baseline = _hesitation_logit(inner, ids, token, demean)[0]
            columns = active[number].nonzero().squeeze(1).tolist()
            for start in range(0, len(columns), batch_size):
                chunk = columns[start:start + batch_size]
                rows_by_layer: dict[int, tuple[list[int], list[int]]] = {}
                for row, column in enumerate(chunk):
                    layer, feature = pool[column]
                    rows_by_layer.setdefault(layer, ([], []))
                    rows_by_layer[layer][0].append(row)
                    rows_by_layer[layer][1].append(feature)
                handles = _zeroing_features(inner, rows_by_layer, prefix)
                try:
                    changed = _hesitation_logit(inner, ids.expand(len(chunk), -1), token, demean)
                finally:
                    for handle in handles:
                        handle.remove()
                measured[number, chunk] = (changed - baseline).cpu()
    return measured, active


def rule_scores(evidences: dict, measured: torch.Tensor, pool: list[tuple[int, int]],
                prompt_numbers: list[int]) -> dict[str, torch.Tensor]:
    """Each rule's score per pool feature from ``prompt_numbers``: the mean predicted change (graph modes; 0 where a
    feature was no node) or the mean measured change (``VERIFIED``)."""
    scores = {}
    for mode, evidence in evidences.items():
        scores[mode] = torch.tensor([sum(evidence.feature_predictions[n].get(key, 0.0) for n in prompt_numbers)
                                     / len(prompt_numbers) for key in pool], dtype=torch.float64)
    scores[VERIFIED] = measured[prompt_numbers].mean(0)
    return scores


def agreement_on(score: torch.Tensor, measured: torch.Tensor, active: torch.Tensor, prompt_numbers: list[int]) -> dict:
    """How well a feature score ranks the real changes on ``prompt_numbers``: Spearman's rank correlation within each
    prompt over the pool features that fire there (averaged over prompts with at least 3), and pooled over every
    (prompt, firing feature) pair."""
    within, predicted, actual = [], [], []
    for number in prompt_numbers:
        mask = active[number]
        predicted += score[mask].tolist()
        actual += measured[number, mask].tolist()
        if int(mask.sum()) >= 3:
            value = rank_correlation(score[mask].tolist(), measured[number, mask].tolist())
            if value == value:
                within.append(value)
    return {"within_prompt_rank_correlation": sum(within) / len(within) if within else float("nan"),
            "rank_correlation": rank_correlation(predicted, actual), "n_prompts": len(within),
            "n_removals": len(actual)}


def _folds(prompts, numbers: list[int]) -> list[list[int]]:
    """Two folds of ``numbers``, alternating by problem (by prompt when they share one problem)."""
    problems = list(dict.fromkeys(_problem_key(prompts[n]) for n in numbers))
    if len(problems) >= 2:
        return [[n for n in numbers if problems.index(_problem_key(prompts[n])) % 2 == fold] for fold in (0, 1)]
    return [numbers[0::2], numbers[1::2]]


def compare_rules(evidences: dict, prompts, measured: torch.Tensor, active: torch.Tensor,
                  pool: list[tuple[int, int]], selection: list[int], evaluation: list[int]) -> dict:
    """Choose the rule (a graph mode of ``evidences`` or ``VERIFIED``) whose scores from one fold of the selection
    prompts rank the real changes on the other fold best (within-prompt rank correlation, both directions averaged);
    then score every rule, made on the whole selection half, on the evaluation half. The choice never sees the
    evaluation half."""
    folds = _folds(prompts, selection)
    rules = [*evidences, VERIFIED]
    cross_fit = {rule: float("nan") for rule in rules}
    if all(folds):
        for rule in rules:
            values = [agreement_on(rule_scores(evidences, measured, pool, fit)[rule], measured, active, test)
                      ["within_prompt_rank_correlation"] for fit, test in (folds, folds[::-1])]
            values = [v for v in values if v == v]
            cross_fit[rule] = sum(values) / len(values) if values else float("nan")
    ranked = sorted(rules, key=lambda r: -cross_fit[r] if cross_fit[r] == cross_fit[r] else float("inf"))
    chosen = ranked[0]
    scores = rule_scores(evidences, measured, pool, selection)
    held_out = {rule: agreement_on(scores[rule], measured, active, evaluation) for rule in rules}
    return {"chosen": chosen,
            "held_out_within_prompt_rank_correlation": held_out[chosen]["within_prompt_rank_correlation"],
            "rules": {rule: {"selection_cross_fit": cross_fit[rule], "held_out": held_out[rule]} for rule in rules},
            "n_selection_prompts": len(selection), "n_evaluation_prompts": len(evaluation),
            "folds": [len(f) for f in folds], "pool_size": len(pool)}


def verified_features(measured: torch.Tensor, pool: list[tuple[int, int]], selection: list[int],
                      mass: float, min_drop: float = 0.0) -> list[tuple[int, int]]:
    """The verified set: pool features ranked by how much removing them lowers the logit on the selection prompts
    (mean over prompts), the fewest carrying ``mass`` of the total drop among those lowering it by more than
    ``min_drop``."""
    return features_by_drop(-measured[selection].mean(0), pool, mass, min_drop)


def features_by_drop(drop: torch.Tensor, pool: list[tuple[int, int]], mass: float,
                     min_drop: float = 0.0) -> list[tuple[int, int]]:
    """The fewest pool features carrying ``mass`` of the total ``drop`` (per feature: how much removing it lowers
    the logit, measured or predicted) among those above ``min_drop``, largest first."""
    order = [int(i) for i in drop.argsort(descending=True) if float(drop[i]) > min_drop]
    total = float(sum(drop[i] for i in order))
    chosen, running = [], 0.0
    for i in order:
        if running >= mass * total:
            break
        chosen.append(pool[i])
        running += float(drop[i])
    return chosen


def select_by_held_out_rule(model, tokenizer, prompts, token: int, evidences: dict, studies: dict,
                            selection: list[int], evaluation: list[int], n_candidates: int = 40,
                            influence_mass: float = 0.8, min_drop: float = 0.0, forced: str | None = None,
                            batch_size: int = 16, progress: bool = True) -> tuple[dict, dict]:
    """The hesitation study of the rule chosen on the selection half (``compare_rules``) among the graph modes of
    ``evidences``, ``GRADIENT`` and ``VERIFIED``, or of ``forced``, and the record of the choice. A mode's study
    selects by influence mass on the selection prompts (``studies[mode]``); the gradient and verified rules select
    from the candidate pool by predicted or measured drop (``features_by_drop``), grouped by the graphs of the
    adapter-model mode that ranked best on the selection half. The record also holds the gradient rule's node
    predictions against the graph modes' intervention checks (``gradient_check``) and the time it took
    (``seconds``)."""
    started = time.time()
    prefix = next(iter(studies.values()))["shared_prefix_tokens"]
    evidences = {**evidences, GRADIENT: gradient_evidence(model, prompts, token, prefix, selection,
                                                          progress=progress)}
    rules = [*evidences, VERIFIED]
    if forced is not None and forced not in rules:
        raise ValueError(f"selection_rule {forced!r} is not one of the compared rules {rules}; add the mode to "
                         "compare_modes or leave selection_rule=None")
    pool = candidate_pool(evidences, n_candidates)
    measured, active = feature_removals(model, prompts, pool, token, prefix=prefix, batch_size=batch_size,
                                        progress=progress)
    compared = compare_rules(evidences, prompts, measured, active, pool, selection, evaluation)
    rule = forced or compared["chosen"]
    graph_modes = [m for m in studies if m != "target"] or list(studies)
    if rule in (VERIFIED, GRADIENT):  # a set from the pool, grouped by the graphs of the best adapter-model mode
        mode = max(graph_modes, key=lambda m: _or_minus_inf(compared["rules"][m]["selection_cross_fit"]))
        drop = (-measured[selection].mean(0) if rule == VERIFIED
                else -rule_scores({GRADIENT: evidences[GRADIENT]}, measured, pool, selection)[GRADIENT])
        chosen = features_by_drop(drop, pool, influence_mass, min_drop)
        study = summarize_evidence(evidences[mode], model, tokenizer, token, selected=chosen)
        study["mode"] = mode
    else:
        mode, study = rule, studies[rule]
    gradient_check = _gradient_check(studies, evidences[GRADIENT])
    record = {"rule": rule, "chosen_on_selection_half": compared["chosen"], "forced": forced is not None,
              "graph_mode": mode, "held_out_within_prompt_rank_correlation":
                  compared["rules"][rule]["held_out"]["within_prompt_rank_correlation"],
              **{k: v for k, v in compared.items() if k not in ("chosen", "held_out_within_prompt_rank_correlation")},
              "selection_prompts": selection, "evaluation_prompts": evaluation,
              "parameters": {"n_candidates": n_candidates, "influence_mass": influence_mass, "min_drop": min_drop},
              "selected_influence_share": study["selected_influence_share"],
              "hesitation_features": study["hesitation_features"], "gradient_check": gradient_check,
              "seconds": round(time.time() - started, 1)}
    study["selection_rule"] = rule
    return study, record


def describe_selection(study: dict, selection: dict) -> str:
    """``select_by_held_out_rule``'s outcome in two lines: the rule, its held-out agreement with removals and the
    set it selected; the nothing-frozen gradient's agreement with the same removals, per scale."""
    gradient = {scale: round(v["within_prompt_rank_correlation"], 3)
                for scale, v in selection["gradient_check"].items()}
    return (f"rule {selection['rule']!r} (chosen on the selection half: {selection['chosen_on_selection_half']!r}); "
            f"held-out within-prompt rank correlation {selection['held_out_within_prompt_rank_correlation']:.3f}; "
            f"{study['hesitation_features']} features carrying {study['selected_influence_share']:.0%} of the "
            f"influence\ngradient x activation (nothing frozen) against the same removals: {gradient}")


def rule_rows(selection: dict) -> dict[str, dict]:
    """``select_by_held_out_rule``'s comparison as a table: per rule, its cross-fit agreement on the selection half
    and each held-out agreement."""
    return {rule: {"selection half (cross-fit)": v["selection_cross_fit"],
                   **{f"held out: {k}": x for k, x in v["held_out"].items()}}
            for rule, v in selection["rules"].items()}


def _gradient_check(studies: dict, gradient: GradientEvidence) -> dict:
    """The gradient rule's node predictions against the real removals the graph modes' intervention checks made
    (their nodes, once each; the adapter model's removals only, so mode "target" is left out), at both scales."""
    records, seen, small = [], set(), None
    for mode, study in studies.items():
        if mode == "target":
            continue
        check = study["intervention_check"]
        small = check["scales"]["small"]["fraction"]
        for record in check["records"]:
            key = (record["prompt"], record["layer"], record["position"], record["feature"])
            if key not in seen:
                seen.add(key)
                records.append(record)
    if not records:
        return {}
    return two_scale_agreement(gradient.annotate(records), small, key="predicted_gradient")


def _or_minus_inf(value: float) -> float:
    return value if value == value else float("-inf")
