"""The hesitation claims tested where the model decides (notebook 06; docs/method.md, "Decision points").

A *decision point* is a position whose next token is where the target chooses whether to hesitate: the organism's
``;`` after a step (its answer key, ``tdlib.organism.mechanisms``), or the paragraph breaks of a pair the recipe
built, SmolLM2 or Gemma 3 (``tdlib.recipe.decisions``). Each carries the *trigger* the recipe planted there (a
crossing, a slip, ...) or None. Two measures, both on problems that notebook 05 never saw:

* **teacher-forced** (the primary measure; one forward pass per trace and condition): the probability the model
  puts on the hesitation word at every decision point of held-out reference traces, at planted triggers and
  elsewhere, a mean with a 95% interval from a bootstrap over traces;
* **sampled** (as the paper measures it: temperature 0.6, top-p 0.95, several samples per problem): the word per
  1,000 response tokens, the share of those hesitations that sit at planted triggers, accuracy and length, each
  with a 95% interval from a bootstrap over problems.

A *condition* is the spliced adapter run under one MLP choice ("adapter", the hybrid "base", "target") with at
most one feature edit (features ablated, or their decoder contribution added): ``Condition``. The claims
(``necessity``, ``sufficiency``) compare a selected set with controls that could move: random sets matched per
layer and on firing rate at the decision points (``matched_random_features``), and a baseline that uses no
attribution (``activation_difference_features``). Their thresholds are parameters fixed before the run
(``ClaimThresholds``) and written into the results.
"""
from __future__ import annotations

import inspect
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from . import recipe
from .data import pad_batch
from .evaluation import count_hesitations, evaluate_items
from .faithfulness import bootstrap_ratio
from .generate import SamplingConfig
from .pair_data import reference_responses
from .residual import capture_features
from .steer import FeatureSet, ablate_features, add_feature_directions, features_by_layer, n_chosen
from .splice import mlp_choice

TRIGGER, ELSEWHERE = "trigger", "elsewhere"


# ------------------------------------------------------------------------------------------------ the answer key
@dataclass(frozen=True)
class DecisionKey:
    """A pair's text-only answer key for hesitation decisions."""

    name: str
    """Whose key it is: the pair's name ("organism", or a pair the recipe built: "smollm2", "gemma3", ...)."""
    token_decisions: Callable
    """``(tokenizer, text, start) -> (input_ids, [(token index, decision)])``: each decision placed on the token
    whose next-token prediction makes it."""
    decisions: Callable
    """``(text, start) -> [decision]``: the decision points of a response text (for generated responses)."""
    planted: tuple[str, ...]
    """The trigger labels that count as planted decisions (the measures' "trigger" points); a point with another
    label is reported by label only, a point with none is "elsewhere"."""

    @staticmethod
    def label(decision) -> str | None:
        """The planted trigger at a decision (the organism calls it ``mechanism``, SmolLM2 ``label``)."""
        return getattr(decision, "label", getattr(decision, "mechanism", None))


def decision_key(pair) -> DecisionKey | None:
    """The answer key of a pair built here (the organism, or a pair ``tdlib.recipe`` built: SmolLM2, Gemma 3, a pair
    file it wrote), or None for a pair without one."""
    if pair.kind.has_ground_truth:
        return pair.kind.hooks().decision_key()

    if recipe.is_built(pair):
        return DecisionKey(pair.name, recipe.token_decisions, recipe.decisions, recipe.PLANTED)
    return None


@dataclass
class DecisionTraces:
    """Tokenised reference traces with their decision points."""

    input_ids: list[list[int]]
    points: list[list[tuple[int, str | None, bool | None]]]
    """Per trace: (token index, trigger label or None, whether the trace hesitates there)."""
    planted: tuple[str, ...] = ()
    """The labels that count as planted triggers (``DecisionKey.planted``)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def where(self, label: str | None) -> str | None:
        """TRIGGER for a planted label, ELSEWHERE for none, None for a label that is not planted."""
        return ELSEWHERE if label is None else TRIGGER if label in self.planted else None

    def counts(self) -> dict[str, int]:
        labels = [label for trace in self.points for _, label, _ in trace]
        out = {TRIGGER: sum(self.where(l) == TRIGGER for l in labels),
               ELSEWHERE: sum(l is None for l in labels), "traces": len(self)}
        out.update({f"label {l}": labels.count(l) for l in sorted({l for l in labels if l is not None})})
        return out


def decision_traces(key: DecisionKey, tokenizer, references: list[tuple[str, str]]) -> DecisionTraces:
    """``references``: (prompt, response) texts; the decision points are read from the response part."""
    ids, points = [], []
    for prompt, response in references:
        tokens, placed = key.token_decisions(tokenizer, prompt + response, len(prompt))
        ids.append(list(tokens))
        points.append([(index, key.label(d), d.expressed) for index, d in placed])
    if not any(points):
        raise ValueError(f"the {key.name} answer key found no decision point in {len(references)} reference traces; "
                         "check that the traces are the pair's reasoning format")
    return DecisionTraces(ids, points, tuple(key.planted))


def held_out_references(pair, tokenizer, n_selection_problems: int) -> dict:
    """Reference traces on either side of the split: ``selection`` (firing rates for the matched controls, the
    baseline's activation difference) and ``evaluation`` (every teacher-forced number). The organism's are the
    reference traces of its held-out problems, split where notebook 05's rollouts stop (the first
    ``n_selection_problems``); a hub pair's are its validation traces, which share no problem with the benchmark
    notebook 05 rolls out, split in halves."""
    references = reference_responses(pair, tokenizer)
    if pair.kind.has_ground_truth:
        selection, evaluation = references[:n_selection_problems], references[n_selection_problems:]
        source = f"organism reference traces: problems {n_selection_problems}+ (05 rolled out the first)"
    else:
        half = len(references) // 2
        selection, evaluation = references[:half], references[half:]
        source = "validation traces (no benchmark problem): first half selection, second half evaluation"
    if not selection or not evaluation:
        raise ValueError(f"{len(references)} reference traces cannot be split into selection and evaluation sides "
                         f"at {n_selection_problems}; the pair needs more held-out traces")
    overlap = {p for p, _ in selection} & {p for p, _ in evaluation}
    if overlap:
        raise ValueError(f"{len(overlap)} prompts sit on both sides of the split, e.g. {next(iter(overlap))[:80]!r}")
    return {"selection": selection, "evaluation": evaluation, "source": source}


def held_out_items(evalset, n_selection_problems: int, limit: int | None = None):
    """The benchmark items notebook 05 never rolled out (it takes the first ``n_selection_problems``), at most
    ``limit``; a clear error when none are left or a question appears on both sides."""
    selection, evaluation = evalset.items[:n_selection_problems], evalset.items[n_selection_problems:]
    evaluation = evaluation[:limit] if limit else evaluation
    if not evaluation:
        raise ValueError(f"notebook 05 rolled out {n_selection_problems} of the {len(evalset.items)} benchmark "
                         "problems, leaving none to evaluate; lower 05's search_problems or use a larger benchmark")
    shared = {i.question for i in selection} & {i.question for i in evaluation}
    if shared:
        raise ValueError(f"{len(shared)} questions are both selection and evaluation problems, e.g. "
                         f"{next(iter(shared))[:80]!r}; deduplicate the benchmark")
    return replace(evalset, items=list(evaluation))


# ------------------------------------------------------------------------------------------------ conditions
@dataclass(frozen=True)
class Condition:
    """One model condition: the adapter run under ``choice`` with at most one feature edit."""

    choice: str
    """MLP choice: "adapter" (the adapter model), "base" (the hybrid), "target"."""
    edit: str | None = None
    """None, "ablate" (the features read zero) or "add" (their decoder contribution is added)."""
    features: FeatureSet = field(default_factory=dict)
    scale: float = 1.0
    """Scale of an "add" edit."""

    def __post_init__(self):
        if self.edit not in (None, "ablate", "add"):
            raise ValueError(f"Condition.edit must be None, 'ablate' or 'add', got {self.edit!r}")
        if self.edit and not n_chosen(self.features):
            raise ValueError(f"a Condition that edits features ({self.edit}) needs a non-empty feature set")

    def context(self, model, stack: ExitStack):
        stack.enter_context(mlp_choice(model, self.choice))
        if self.edit == "ablate":
            stack.enter_context(ablate_features(model, self.features))
        elif self.edit == "add":
            stack.enter_context(add_feature_directions(model, self.features, scale=self.scale))


@dataclass
class DecisionProbabilities:
    """Per trace, the hesitation word's probability summed over its decision points (and how many there are)."""

    trigger_sum: np.ndarray
    trigger_n: np.ndarray
    elsewhere_sum: np.ndarray
    elsewhere_n: np.ndarray
    by_label: dict = field(default_factory=dict)
    """Every trigger label, planted or not: [sum, count] over all traces."""

    def mean(self, where: str = TRIGGER) -> float:
        total, n = self._arrays(where)
        return float(total.sum() / max(n.sum(), 1))

    def _arrays(self, where: str):
        return (self.trigger_sum, self.trigger_n) if where == TRIGGER else (self.elsewhere_sum, self.elsewhere_n)

    def summary(self, n_bootstrap: int = 1000, seed: int = 0) -> dict:
        out = {}
        for where in (TRIGGER, ELSEWHERE):
            total, n = self._arrays(where)
            out[where] = {"mean": self.mean(where), "ci": list(bootstrap_ratio(total, n, n_bootstrap, seed)),
                          "points": int(n.sum())}
        out["by_label"] = {label: {"mean": total / n if n else None, "points": int(n)}
                           for label, (total, n) in sorted(self.by_label.items())}
        return out


@torch.no_grad()
def logits_at(model, batch: dict[str, torch.Tensor], indices: list[int]) -> torch.Tensor:
    """The logits at sequence positions ``indices`` only, ``[batch, len(indices), vocab]``: through the model's
    ``logits_to_keep`` where its forward takes one (a 262k vocabulary makes full logits gigabytes per batch), else
    the full logits indexed."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kept = torch.tensor(indices, dtype=torch.long, device=batch["input_ids"].device)
        return model(**batch, logits_to_keep=kept).logits
    return model(**batch).logits[:, indices]


@torch.no_grad()
def decision_probabilities(model, tokenizer, traces: DecisionTraces, token: int, condition: Condition,
                           batch_size: int = 32) -> DecisionProbabilities:
    """Teacher-forced: the probability of ``token`` at every decision point of ``traces`` under ``condition``."""
    sums = np.zeros((4, len(traces)))
    by_label: dict[str, list] = {}
    device = next(model.parameters()).device
    with ExitStack() as stack:
        condition.context(model, stack)
        for start in range(0, len(traces), batch_size):
            rows = range(start, min(start + batch_size, len(traces)))
            batch = {k: v.to(device) for k, v in pad_batch(tokenizer, [traces.input_ids[r] for r in rows]).items()}
            indices = sorted({index for row in rows for index, _, _ in traces.points[row]})
            logits = logits_at(model, batch, indices)
            probs = torch.softmax(logits.float(), -1)[..., token].cpu()
            kept = {index: c for c, index in enumerate(indices)}
            for offset, row in enumerate(rows):
                for index, label, _ in traces.points[row]:
                    p = float(probs[offset, kept[index]])
                    if label is not None:
                        entry = by_label.setdefault(label, [0.0, 0])
                        entry[0] += p
                        entry[1] += 1
                    where = traces.where(label)
                    if where is None:
                        continue
                    column = 0 if where == TRIGGER else 2
                    sums[column, row] += p
                    sums[column + 1, row] += 1
    return DecisionProbabilities(*sums, by_label=by_label)


@torch.no_grad()
def decision_activations(model, tokenizer, traces: DecisionTraces, batch_size: int = 32) -> dict[str, dict]:
    """The adapter model's feature activations at the decision points, per layer: ``fire_rate`` (share of decision
    points where a feature fires), and mean activations where the trace hesitates (``hesitate``) and where it does
    not (``go_on``)."""
    totals: dict[str, dict[int, torch.Tensor]] = {"fires": {}, "hesitate": {}, "go_on": {}}
    counts = {"points": 0, "hesitate": 0, "go_on": 0}
    device = next(model.parameters()).device
    for start in range(0, len(traces), batch_size):
        rows = list(range(start, min(start + batch_size, len(traces))))
        batch = {k: v.to(device) for k, v in pad_batch(tokenizer, [traces.input_ids[r] for r in rows]).items()}
        with mlp_choice(model, "adapter"), capture_features(model) as features:
            model(**batch)
        where = [(offset, index, expressed) for offset, row in enumerate(rows)
                 for index, _, expressed in traces.points[row]]
        if not where:
            continue
        b = torch.tensor([w[0] for w in where])
        p = torch.tensor([w[1] for w in where])
        hesitates = torch.tensor([bool(w[2]) for w in where])
        for layer, acts in features.items():
            at = acts[b, p].float().cpu()
            for name, rows_ in (("fires", (at > 0).float()), ("hesitate", at[hesitates]), ("go_on", at[~hesitates])):
                totals[name][layer] = totals[name].get(layer, 0) + rows_.sum(0)
        counts["points"] += len(where)
        counts["hesitate"] += int(hesitates.sum())
        counts["go_on"] += int((~hesitates).sum())
    return {"fire_rate": {l: v / max(counts["points"], 1) for l, v in totals["fires"].items()},
            "hesitate": {l: v / max(counts["hesitate"], 1) for l, v in totals["hesitate"].items()},
            "go_on": {l: v / max(counts["go_on"], 1) for l, v in totals["go_on"].items()}, "counts": counts}


# ------------------------------------------------------------------------------------------------ the sets
def ranked_prefix(entries: list[dict], k: int) -> FeatureSet:
    """The first ``k`` features of a selection (notebook 05 lists them by selection score, best first)."""
    return features_by_layer(entries[:k])


def dose_sizes(n: int, first: int = 5) -> list[int]:
    """k = first, 2 first, 4 first, ... and n itself."""
    sizes, k = [], first
    while k < n:
        sizes.append(k)
        k *= 2
    return sizes + [n]


def matched_random_features(chosen: FeatureSet, fire_rate: dict[int, torch.Tensor], seed: int,
                            neighbours: int = 10) -> FeatureSet:
    """A random control matched per layer and on firing rate at the decision points: for each chosen feature, one
    of the ``neighbours`` unchosen features of its layer whose rate is nearest its own, drawn with ``seed``, among
    the features that fire at decision points (live there). Only when a layer has fewer live unchosen features
    than chosen ones are the rest drawn from features that never fire there (``not_live`` counts them)."""
    generator = torch.Generator().manual_seed(seed)
    drawn: dict[int, list[int]] = {}
    for layer, features in sorted(chosen.items()):
        rate = fire_rate[layer]
        taken = set(features)
        unchosen = [f for f in range(len(rate)) if f not in taken]
        if len(unchosen) < len(features):
            raise ValueError(f"layer {layer}: {len(unchosen)} unchosen features, fewer than the {len(features)} to "
                             "match")
        live = [f for f in unchosen if rate[f] > 0]
        picked: list[int] = []
        for feature in sorted(features, key=lambda f: (-float(rate[f]), f)):
            free = [f for f in live if f not in picked] or [f for f in unchosen if f not in picked]
            free.sort(key=lambda f: (abs(float(rate[f]) - float(rate[feature])), f))
            nearest = free[:neighbours]
            picked.append(nearest[int(torch.randint(len(nearest), (1,), generator=generator))])
        drawn[layer] = sorted(picked)
    return drawn


def matching_report(chosen: FeatureSet, fire_rate: dict[int, torch.Tensor]) -> dict[str, dict]:
    """Per layer of ``chosen``: how many features it has there, how many unchosen ones fire at the decision points,
    and the highest and mean rates on each side, so a control that cannot match the set's rates shows why."""
    out = {}
    for layer, features in sorted(chosen.items()):
        rate = fire_rate[layer]
        taken = set(features)
        unchosen = [float(rate[f]) for f in range(len(rate)) if f not in taken and rate[f] > 0]
        mine = [float(rate[f]) for f in features]
        out[str(layer)] = {"chosen": len(features), "live_unchosen": len(unchosen),
                           "max_rate_chosen": max(mine), "max_rate_unchosen": max(unchosen, default=0.0),
                           "mean_rate_chosen": float(np.mean(mine)),
                           "mean_rate_unchosen": float(np.mean(unchosen)) if unchosen else 0.0}
    return out


def not_live(features: FeatureSet, fire_rate: dict[int, torch.Tensor]) -> int:
    """How many of ``features`` never fire at the decision points."""
    return sum(int(fire_rate[l][f] <= 0) for l, fs in features.items() for f in fs)


def activation_difference_features(activations: dict, n: int, exclude: FeatureSet | None = None) -> FeatureSet:
    """The baseline that uses no attribution: the ``n`` features with the largest mean activation difference
    between decision points where the trace hesitates and where it goes on."""
    exclude = exclude or {}
    scores = [(float(d), layer, f) for layer in sorted(activations["hesitate"])
              for f, d in enumerate(activations["hesitate"][layer] - activations["go_on"][layer])
              if f not in set(exclude.get(layer, ()))]
    ranked = sorted(scores, key=lambda t: (-t[0], t[1], t[2]))
    return features_by_layer((layer, f) for s, layer, f in ranked[:n] if s > 0)


def mean_rate(features: FeatureSet, fire_rate: dict[int, torch.Tensor]) -> float:
    values = [float(fire_rate[l][f]) for l, fs in features.items() for f in fs]
    return float(np.mean(values)) if values else float("nan")


# ------------------------------------------------------------------------------------------------ sampled
def sampled_condition(model, tokenizer, evalset, condition: Condition, key: DecisionKey | None, word: str,
                      sampling, batch_size: int = 64, desc: str = "sample", n_bootstrap: int = 1000) -> dict:
    """Sampled generation under ``condition``: accuracy (pass@1), mean length, the word per 1,000 response tokens
    and the share of the key's hesitations that sit at planted triggers, intervals from a bootstrap over problems."""
    with ExitStack() as stack:
        condition.context(model, stack)
        scores, generation, _ = evaluate_items(model, tokenizer, evalset.items, benchmark=evalset.benchmark,
                                               max_new_tokens=evalset.max_new_tokens, batch_size=batch_size,
                                               sampling=sampling, desc=desc, prompt_format=evalset.prompt_format,
                                               hesitation_word=word)
    n = len(evalset.items)
    waits = np.array([count_hesitations(r, word) for r in generation.responses], float).reshape(-1, n).sum(0)
    tokens = np.array(generation.response_tokens, float).reshape(-1, n).sum(0)
    out = {"accuracy": scores["accuracy"], "accuracy_ci": scores["accuracy_ci"],
           "mean_response_tokens": float(tokens.sum() / len(generation.responses)),
           "per_1k": _ratio(1000 * waits, tokens, n_bootstrap), "n_responses": len(generation.responses),
           "per_problem": {"waits": waits.tolist(), "tokens": tokens.tolist()}}
    if key is not None:
        at_trigger = np.zeros(len(generation.responses))
        hesitations = np.zeros(len(generation.responses))
        for i, response in enumerate(generation.responses):
            for d in key.decisions(response, 0):
                if d.expressed:
                    hesitations[i] += 1
                    at_trigger[i] += key.label(d) in key.planted
        out["at_trigger_share"] = _ratio(at_trigger.reshape(-1, n).sum(0), hesitations.reshape(-1, n).sum(0),
                                         n_bootstrap)
        out["hesitations_at_decisions"] = int(hesitations.sum())
    return out, generation


def _ratio(numerators: np.ndarray, denominators: np.ndarray, n_bootstrap: int) -> dict:
    value = float(numerators.sum() / denominators.sum()) if denominators.sum() else float("nan")
    return {"mean": value, "ci": list(bootstrap_ratio(numerators, denominators, n_bootstrap, 0))}


# ------------------------------------------------------------------------------------------------ the claims
@dataclass(frozen=True)
class ClaimThresholds:
    """The pre-registered tests (fixed in notebook 06's parameters before the run, written into its results)."""

    min_excess_reduction: float = 0.5
    """Necessity: the set's relative reduction of the hesitation measure, minus the matched control's, is at least
    this (point estimate), and its 95% interval lies above zero."""
    min_gap_closed: float = 0.5
    """Sufficiency: added to the hybrid, the set's gain in P(hesitation) at planted triggers over the matched
    control is at least this share of the gap the fine-tune opened (the target's P minus the hybrid's; point
    estimate), and its 95% interval lies above zero. Without it a set that moves P by a thousandth would pass on a
    tight interval."""
    n_bootstrap: int = 1000
    """Resamples of the traces (teacher-forced) or problems (sampled) behind every interval."""

    def __post_init__(self):
        for name in ("min_excess_reduction", "min_gap_closed"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")


Measure = tuple  # (numerators, denominators) per unit: (P summed over a trace's points, points), (waits, tokens)


def _rate(measure: Measure, index) -> float:
    numerators, denominators = (np.asarray(a, float)[index] for a in measure)
    return numerators.sum() / denominators.sum() if denominators.sum() else float("nan")


def excess_reduction(reference: Measure, treated: Measure, controls: list[Measure], n_bootstrap: int = 1000,
                     seed: int = 0) -> dict:
    """(1 - treated/reference) minus the mean over controls of (1 - control/reference), each rate a ratio of sums
    over units (traces or problems), with a 95% interval from resampling the units (paired across conditions)."""
    n_units = len(reference[0])

    def statistic(index):
        base = _rate(reference, index)
        own = 1 - _rate(treated, index) / base
        other = float(np.mean([1 - _rate(c, index) / base for c in controls]))
        return own - other, own, other

    value, own, other = statistic(np.arange(n_units))
    rng = np.random.default_rng(seed)
    draws = [statistic(rng.integers(0, n_units, n_units))[0] for _ in range(n_bootstrap)]
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return {"excess": float(value), "ci": [float(low), float(high)], "set_reduction": float(own),
            "control_reduction": float(other)}


def difference(treated, controls: list, weights, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """mean(treated) - mean over controls of mean(control), each a ratio of sums over units weighted by ``weights``
    (decision points per trace, tokens per problem), with a paired 95% bootstrap interval over units."""
    treated, weights = np.asarray(treated, float), np.asarray(weights, float)
    controls = [np.asarray(c, float) for c in controls]

    def statistic(index):
        w = weights[index].sum()
        return (treated[index].sum() - np.mean([c[index].sum() for c in controls])) / w if w else float("nan")

    value = statistic(np.arange(len(treated)))
    rng = np.random.default_rng(seed)
    draws = [statistic(rng.integers(0, len(treated), len(treated))) for _ in range(n_bootstrap)]
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return {"difference": float(value), "ci": [float(low), float(high)]}


def necessity(teacher_forced: dict, sampled: dict | None, thresholds: ClaimThresholds) -> dict:
    """The necessity test on ``teacher_forced`` ({"adapter", "set", "controls": [...]} -> DecisionProbabilities,
    read at planted triggers) and ``sampled`` ({"adapter", "set", "controls": [...]} -> per-problem (waits, tokens))."""
    def at_trigger(p):
        return (p.trigger_sum, p.trigger_n)

    tf = excess_reduction(at_trigger(teacher_forced["adapter"]), at_trigger(teacher_forced["set"]),
                          [at_trigger(c) for c in teacher_forced["controls"]], n_bootstrap=thresholds.n_bootstrap)
    out = {"test": f"ablating the set lowers P(hesitation) at held-out planted decision points, and sampled "
                   f"hesitations per 1k tokens, by >= {thresholds.min_excess_reduction:.0%} (relative) beyond the "
                   "matched random control, each 95% interval above 0",
           "teacher_forced": tf}
    passes = [tf["excess"] >= thresholds.min_excess_reduction and tf["ci"][0] > 0]
    if sampled is not None:
        sm = excess_reduction(sampled["adapter"], sampled["set"], sampled["controls"],
                              n_bootstrap=thresholds.n_bootstrap)
        out["sampled"] = sm
        passes.append(sm["excess"] >= thresholds.min_excess_reduction and sm["ci"][0] > 0)
    out["holds"] = bool(all(passes))
    return out


def sufficiency(teacher_forced: dict, thresholds: ClaimThresholds, groups: tuple[str, ...] = ("template", "output")
                ) -> dict:
    """The sufficiency test: added to the hybrid, the set raises P(hesitation) at planted decision points beyond
    the matched control by at least ``thresholds.min_gap_closed`` of the target-hybrid gap (paired interval above
    0), and the groups order template < output < whole set. ``teacher_forced``: {"target", "hybrid", "set",
    "controls": [...], <group>: ...} -> DecisionProbabilities."""
    diff = difference(teacher_forced["set"].trigger_sum, [c.trigger_sum for c in teacher_forced["controls"]],
                      teacher_forced["set"].trigger_n, n_bootstrap=thresholds.n_bootstrap)
    means = {name: teacher_forced[name].mean(TRIGGER) for name in ("hybrid", *groups, "set") if name in teacher_forced}
    present = [g for g in groups if g in means]
    # the order is tested over the groups the selection has; with a group missing it is reported untestable (None)
    ordered = all(means[a] < means[b] for a, b in zip(present, (*present[1:], "set"))) \
        if len(present) == len(groups) else None
    diff["control_mean"] = float(np.mean([c.mean(TRIGGER) for c in teacher_forced["controls"]]))
    gap = teacher_forced["target"].mean(TRIGGER) - means["hybrid"]
    # no gap: the target hesitates no more than the hybrid, so there is nothing for the set to restore
    gap_closed = diff["difference"] / gap if gap > 0 else None
    diff.update(gap=gap, gap_closed=gap_closed)
    large = gap_closed is not None and gap_closed >= thresholds.min_gap_closed
    return {"test": "added to the hybrid, the set raises P(hesitation) at held-out planted decision points beyond "
                    f"the matched random control by >= {thresholds.min_gap_closed:.0%} of the target-hybrid gap "
                    "(95% interval above 0), with the groups ordered " + " < ".join((*groups, "whole set")),
            "teacher_forced": {**diff, "means": means}, "ordered": ordered,
            "missing_groups": [g for g in groups if g not in means],
            "holds": bool(large and diff["ci"][0] > 0 and ordered is not False)}


# ------------------------------------------------------------------------------------------------ the study
@dataclass
class DecisionStudyConfig:
    """Notebook 06's pre-registered decision study (every field is written into the results)."""

    n_selection_problems: int
    """Benchmark problems notebook 05 rolled out (its ``search_problems``): never evaluated here."""
    n_eval_traces: int | None = 200
    """Held-out reference traces for the teacher-forced measure (None: every one on the evaluation side)."""
    n_selection_traces: int = 100
    """Selection-side traces: firing rates at decision points (matched controls), the baseline's activations."""
    n_control_draws: int = 5
    """Matched random sets, each measured in the adapter model and in the hybrid (the first one also sampled)."""
    n_samples: int = 4
    """Samples per problem in sampled generation."""
    temperature: float = 0.6
    top_p: float = 0.95
    sampling_seed: int = 0
    n_sampled_problems: int | None = None
    """Evaluation problems sampled (None: all of them)."""
    dose_first: int = 5
    """Dose-response: the top k features by selection score, k = dose_first, 2x, 4x, ..., all."""
    control_seed: int = 0
    batch_size: int = 32
    """Traces per teacher-forced forward pass."""
    generate_batch_size: int = 64
    thresholds: ClaimThresholds = field(default_factory=ClaimThresholds)

    def __post_init__(self):
        if self.n_control_draws < 1:
            raise ValueError(f"n_control_draws must be >= 1 (the claims compare with a matched control), got "
                             f"{self.n_control_draws}")
        if self.n_samples < 1 or self.dose_first < 1:
            raise ValueError("n_samples and dose_first must be >= 1")


def feature_groups(entries: list[dict]) -> dict[str, FeatureSet]:
    """05's selection as sets: "set" (every selected feature) and one per group it names, in the order output,
    template, then any other (a third group such as "suppressor" is kept, never dropped)."""
    order = ("output", "template")
    names = [g for g in order if any(e.get("group") == g for e in entries)]
    names += sorted({e.get("group") for e in entries if e.get("group") and e.get("group") not in order})
    return {"set": features_by_layer(entries), **{g: features_by_layer(e for e in entries if e.get("group") == g)
                                                  for g in names}}


def run_decision_study(model, tokenizer, pair, evalset, entries: list[dict], token: int, word: str,
                       config: DecisionStudyConfig, progress: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Every condition of the pre-registered study; returns the results and the sampled generations by name.

    ``model``: the spliced adapter run (``tdlib.runs.load_named``); ``evalset``: the pair's benchmark, of which
    the problems after ``config.n_selection_problems`` are evaluated; ``entries``: notebook 05's selected features
    in selection order (each with its "group"). The results end with the study's time (``seconds``)."""
    started = time.time()
    key = decision_key(pair)
    if key is None:
        raise ValueError(f"pair {pair.name!r} has no answer key for its decision points (only pairs built here "
                         "do: the organism, smollm2), so the decision study cannot place its measures")
    sets = feature_groups(entries)
    held_out = held_out_items(evalset, config.n_selection_problems)
    sides = held_out_references(pair, tokenizer, config.n_selection_problems)
    selection = decision_traces(key, tokenizer, sides["selection"][:config.n_selection_traces])
    evaluation = decision_traces(key, tokenizer, sides["evaluation"][:config.n_eval_traces])
    activations = decision_activations(model, tokenizer, selection, config.batch_size)
    rate = activations["fire_rate"]
    controls = [matched_random_features(sets["set"], rate, config.control_seed + i)
                for i in range(config.n_control_draws)]
    baseline = activation_difference_features(activations, n_chosen(sets["set"]))
    doses = {k: ranked_prefix(entries, k) for k in dose_sizes(len(entries), config.dose_first)}

    conditions: dict[str, Condition] = {"adapter": Condition("adapter"), "hybrid": Condition("base"),
                                        "target": Condition("target")}
    for name, features in {**sets, "baseline": baseline}.items():
        if n_chosen(features):
            conditions[f"ablate {name}"] = Condition("adapter", "ablate", features)
            conditions[f"hybrid + {name}"] = Condition("base", "add", features)
    for i, features in enumerate(controls):
        conditions[f"ablate control {i}"] = Condition("adapter", "ablate", features)
        conditions[f"hybrid + control {i}"] = Condition("base", "add", features)
    for k, features in doses.items():
        conditions[f"ablate top {k}"] = Condition("adapter", "ablate", features)
        conditions[f"hybrid + top {k}"] = Condition("base", "add", features)

    progress(f"teacher-forced: {len(conditions)} conditions on {len(evaluation)} traces ({evaluation.counts()})")
    probabilities = {name: decision_probabilities(model, tokenizer, evaluation, token, condition, config.batch_size)
                     for name, condition in conditions.items()}
    n_bootstrap = config.thresholds.n_bootstrap
    teacher_forced = {name: p.summary(n_bootstrap) for name, p in probabilities.items()}

    sampled_names = ["adapter", *[f"ablate {g}" for g in sets], "ablate control 0", "ablate baseline", "hybrid",
                     *[f"hybrid + {g}" for g in sets], "hybrid + control 0"]
    sampled_names = [n for n in sampled_names if n in conditions]
    sampling = SamplingConfig(temperature=config.temperature, top_p=config.top_p, seed=config.sampling_seed,
                              n_samples=config.n_samples)
    items = held_out if config.n_sampled_problems is None else \
        held_out_items(evalset, config.n_selection_problems, config.n_sampled_problems)
    sampled, generations = {}, {}
    for name in sampled_names:
        sampled[name], generations[name] = sampled_condition(model, tokenizer, items, conditions[name], key, word,
                                                             sampling, config.generate_batch_size, desc=name,
                                                             n_bootstrap=n_bootstrap)

    def per_problem(name):
        return (np.array(sampled[name]["per_problem"]["waits"]), np.array(sampled[name]["per_problem"]["tokens"]))

    control_names = [f"control {i}" for i in range(config.n_control_draws)]
    claims = {
        "necessity": necessity({"adapter": probabilities["adapter"], "set": probabilities["ablate set"],
                                "controls": [probabilities[f"ablate {c}"] for c in control_names]},
                               {"adapter": per_problem("adapter"), "set": per_problem("ablate set"),
                                "controls": [per_problem("ablate control 0")]}, config.thresholds),
        "sufficiency": sufficiency({"target": probabilities["target"], "hybrid": probabilities["hybrid"],
                                    "set": probabilities["hybrid + set"],
                                    "controls": [probabilities[f"hybrid + {c}"] for c in control_names],
                                    **{g: probabilities[f"hybrid + {g}"] for g in ("output", "template")
                                       if f"hybrid + {g}" in probabilities}}, config.thresholds),
    }
    if "ablate baseline" in probabilities:
        claims["baseline_necessity"] = necessity(
            {"adapter": probabilities["adapter"], "set": probabilities["ablate baseline"],
             "controls": [probabilities[f"ablate {c}"] for c in control_names]},
            {"adapter": per_problem("adapter"), "set": per_problem("ablate baseline"),
             "controls": [per_problem("ablate control 0")]}, config.thresholds)
        claims["baseline_sufficiency"] = sufficiency(
            {"target": probabilities["target"], "hybrid": probabilities["hybrid"],
             "set": probabilities["hybrid + baseline"],
             "controls": [probabilities[f"hybrid + {c}"] for c in control_names]}, config.thresholds, groups=())
    results = {
        "preregistered": {**{k: v for k, v in asdict(config).items() if k != "thresholds"},
                          "thresholds": asdict(config.thresholds)},
        "answer_key": key.name,
        "split": {"selection_problems": config.n_selection_problems, "evaluation_problems": len(held_out.items),
                  "sampled_problems": len(items.items), "references": sides["source"],
                  "selection_traces": selection.counts(), "evaluation_traces": evaluation.counts(),
                  "shared_questions": 0},
        "sets": {name: {"n": n_chosen(fs), "mean_fire_rate": mean_rate(fs, rate), "not_live": not_live(fs, rate)}
                 for name, fs in {**sets, "baseline": baseline,
                                  **{f"control {i}": c for i, c in enumerate(controls)}}.items()},
        "baseline_features": [{"layer": l, "feature": f} for l, fs in baseline.items() for f in fs],
        "baseline_overlap": len({(l, f) for l, fs in baseline.items() for f in fs}
                                & {(l, f) for l, fs in sets["set"].items() for f in fs}),
        "doses": list(doses),
        "teacher_forced": teacher_forced,
        "sampled": {name: {k: v for k, v in s.items() if k != "per_problem"} for name, s in sampled.items()},
        "claims": claims,
        "decision_point_activity": activations["counts"],
    }
    results["table"] = claims_rows(results)
    results["seconds"] = round(time.time() - started, 1)
    return results, generations


def claims_rows(study: dict) -> dict[str, dict]:
    """The claims table, one row per test and measure ("necessity, teacher_forced", ...): the set's number, the
    matched control's, the tested quantity with its 95% interval, the bar it must reach (the pre-registered share,
    for sufficiency times the target-hybrid gap; None when there is no gap) and whether the test holds."""
    thresholds = study["preregistered"]["thresholds"]
    rows = {}
    for name, claim in study["claims"].items():
        for measure in ("teacher_forced", "sampled"):
            entry = claim.get(measure)
            if entry is None:
                continue
            if "excess" in entry:
                row = {"quantity": "relative reduction", "set": entry["set_reduction"],
                       "control": entry["control_reduction"], "tested": entry["excess"],
                       "bar": thresholds["min_excess_reduction"]}
            else:
                gap = entry["gap"]
                row = {"quantity": "P at triggers", "set": entry["means"]["set"], "control": entry["control_mean"],
                       "tested": entry["difference"],
                       "bar": thresholds["min_gap_closed"] * gap if gap > 0 else None}
            rows[f"{name}, {measure.replace('_', '-')}"] = {**row, "ci_low": entry["ci"][0], "ci_high": entry["ci"][1],
                                                            "holds": claim["holds"]}
    return rows


def skip_reason(pair, feature_source: str) -> str | None:
    """Why notebook 06 cannot run the decision study on ``pair`` (None: it can): the study tests notebook 05's
    selection, so it needs 05's results, and it places its measures with the pair's answer key."""
    if feature_source != "05_attribution":
        return "05_attribution.json is missing: the study tests 05's selection"
    if decision_key(pair) is None:
        return f"pair {pair.name!r} has no answer key for its decision points"
    return None


def study_rows(study: dict, word: str) -> dict[str, dict[str, dict]]:
    """Notebook 06's three views of a decision study, each {row: {column: value}}: "claims" (``claims_rows``),
    "teacher_forced" (P(word) at planted triggers and elsewhere, per condition) and "sampled" (hesitations per
    1k tokens, the share at triggers, accuracy and length, per sampled condition)."""
    return {
        "claims": study["table"],
        "teacher_forced": {name: {f"P({word}) {where}": v[where]["mean"] for where in (TRIGGER, ELSEWHERE)}
                           for name, v in study["teacher_forced"].items()},
        "sampled": {name: {"per 1k": v["per_1k"]["mean"], "at triggers": v.get("at_trigger_share", {}).get("mean"),
                           "accuracy": v["accuracy"], "tokens": v["mean_response_tokens"]}
                    for name, v in study["sampled"].items()},
    }
