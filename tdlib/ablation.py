"""Notebook 06's experiment: the hesitation features ablated in the adapter model, added to the hybrid, used to
steer the target, against random controls (docs/method.md), generating with the hooks of ``tdlib.steer``.

Feature sets come from notebook 05's attribution (``tdlib.steer.features_from_attribution``) or, when 05 has not
run, from ``select_hesitation_features``: a simple, clearly labelled fallback that ranks features by how much more
they fire right before the hesitation token than elsewhere on held-out reasoning traces.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from .evaluation import count_hesitations, evaluate_items
from .faithfulness import bootstrap_ratio
from .generate import Generation
from .models import anatomy
from .paper import hesitation_reference, hesitation_share
from .problems import EvalSet
from .residual import capture_features
from .splice import mlp_choice
from .steer import (FeatureSet, ablate_features, add_feature_directions, as_entries, chosen_adapters, clamp_features,
                    features_by_layer, features_from_attribution, n_chosen, random_features, union)

FALLBACK_SOURCE = "fallback: features most selectively active right before 'wait' (05_attribution.json missing)"


# ------------------------------------------------------------------------------------- statistics, selection
@dataclass
class FeatureStats:
    """Per-layer feature statistics of the adapter model on held-out reasoning traces (teacher-forced)."""

    pre_wait_mean: dict[int, torch.Tensor]
    """Mean activation at positions whose next token is the hesitation token, [n_features]."""
    other_mean: dict[int, torch.Tensor]
    """Mean activation at every other (non-padding) position, [n_features]."""
    fire_count: dict[int, torch.Tensor]
    """Tokens on which each feature fired (activation > 0)."""
    active_mean: dict[int, torch.Tensor]
    """Mean of each feature's nonzero activations (0 for features that never fired): the clamp value."""
    n_pre_wait: int
    n_tokens: int

    @property
    def n_features(self) -> int:
        """Features over all layers."""
        return sum(len(counts) for counts in self.fire_count.values())

    def alive(self, layer: int) -> torch.Tensor:
        return self.fire_count[layer] > 0

    def clamp_values(self, features: FeatureSet) -> dict[int, list[float]]:
        return {layer: self.active_mean[layer][chosen].tolist() for layer, chosen in features.items()}


@torch.no_grad()
def collect_feature_stats(model, batches: Iterable[dict], wait_id: int) -> FeatureStats:
    """Run the adapter model over ``batches`` and gather the statistics in ``FeatureStats``."""
    sums: dict[str, dict[int, torch.Tensor]] = {"pre": {}, "other": {}, "count": {}, "active": {}}
    n_pre = n_tokens = 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        pre_wait = torch.zeros_like(mask)
        pre_wait[:, :-1] = (ids[:, 1:] == wait_id) & mask[:, 1:]
        other = mask & ~pre_wait
        with mlp_choice(model, "adapter"), capture_features(model) as features:
            model(input_ids=ids, attention_mask=batch["attention_mask"])
        for layer, acts in features.items():
            acts = acts.float()
            for key, rows in (("pre", acts[pre_wait].sum(0)), ("other", acts[other].sum(0)),
                              ("count", (acts[mask] > 0).sum(0).float()), ("active", acts[mask].sum(0))):
                sums[key][layer] = sums[key].get(layer, 0) + rows
        n_pre += int(pre_wait.sum())
        n_tokens += int(mask.sum())
    if not sums["count"]:
        raise ValueError("no adapter features were captured: the model has no adapters or the batches are empty")
    n_other = n_tokens - n_pre
    return FeatureStats(
        pre_wait_mean={k: v / max(n_pre, 1) for k, v in sums["pre"].items()},
        other_mean={k: v / max(n_other, 1) for k, v in sums["other"].items()},
        fire_count=sums["count"],
        active_mean={k: v / sums["count"][k].clamp(min=1) for k, v in sums["active"].items()},
        n_pre_wait=n_pre, n_tokens=n_tokens)


def select_hesitation_features(stats: FeatureStats, n: int) -> FeatureSet:
    """FALLBACK selector (when notebook 05's attribution is missing): the ``n`` features, over all layers, with
    the largest (mean activation right before "wait") - (mean activation elsewhere); only positive scores."""
    if stats.n_pre_wait == 0:
        raise ValueError("the held-out text has no 'wait' tokens, so no hesitation features can be selected")
    scores = [(float(s), layer, f) for layer in sorted(stats.pre_wait_mean)
              for f, s in enumerate(stats.pre_wait_mean[layer] - stats.other_mean[layer])]
    ranked = [(layer, f) for s, layer, f in sorted(scores, key=lambda t: (-t[0], t[1], t[2])) if s > 0]
    return features_by_layer(ranked[:n])


def fallback_count(n_features_total: int, share: float | None = None) -> int:
    """How many features the fallback selects: ``share`` of all features (None: the paper's hesitation share,
    ``tdlib.paper.hesitation_share``)."""
    return max(1, math.ceil((hesitation_share() if share is None else share) * n_features_total))


def feature_sets_for(attribution: dict | None, adapter_model: str, stats: FeatureStats,
                     fallback_share: float | None = None) -> tuple[dict[str, FeatureSet], str]:
    """The feature sets notebook 06 studies and where they came from: notebook 05's selection (``attribution``,
    which must have studied ``adapter_model``) with its groups, or, when 05's results are missing, the fallback
    selector's (``select_hesitation_features``) as the single set "all"."""
    if attribution is None:
        n = fallback_count(stats.n_features, fallback_share)
        return {"all": select_hesitation_features(stats, n)}, FALLBACK_SOURCE
    if attribution.get("analysis_model") != adapter_model:
        raise ValueError(f"05_attribution.json selected features of {attribution.get('analysis_model')!r}, this run "
                         f"studies {adapter_model!r}: run notebook 05 with the same adapter= first")
    return features_from_attribution(attribution), "05_attribution"


# ----------------------------------------------------------------------------------------------- measuring
def wait_metrics(generation: Generation, word: str, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Hesitation counts beside the accuracy metrics: the pair's hesitation ``word`` (as a word, any case) per 1,000
    response tokens (the paper's metric) and the total count, with 95% intervals on the rate and on the mean
    response length from a bootstrap over responses."""
    waits = np.array([count_hesitations(r, word) for r in generation.responses], dtype=float)
    tokens = np.array(generation.response_tokens, dtype=float)
    rate = bootstrap_ratio(1000 * waits, tokens, n_bootstrap, seed)
    length = bootstrap_ratio(tokens, np.ones_like(tokens), n_bootstrap, seed)
    return {"wait_per_1k_tokens": float(1000 * waits.sum() / max(tokens.sum(), 1)), "wait_per_1k_tokens_ci": list(rate),
            "mean_response_tokens_ci": list(length), "n_wait": int(waits.sum())}


def run_condition(model, tokenizer, evalset: EvalSet, batch_size: int = 100, desc: str = "generate",
                  *, word: str) -> tuple[dict, Generation]:
    """Greedy generation on ``evalset`` under whatever hooks/choice are active; accuracy, length and hesitation."""
    metrics, generation, _ = evaluate_items(model, tokenizer, evalset.items, benchmark=evalset.benchmark,
                                            max_new_tokens=evalset.max_new_tokens, batch_size=batch_size, desc=desc,
                                            prompt_format=evalset.prompt_format, hesitation_word=word)
    return {**metrics, **wait_metrics(generation, word)}, generation


def run_under(model, tokenizer, evalset: EvalSet, choice, contexts, config: "AblationConfig",
              desc: str) -> tuple[dict, Generation]:
    """``run_condition`` with the MLP choice ``choice`` and the hook contexts ``contexts`` in place."""
    with ExitStack() as stack:
        stack.enter_context(mlp_choice(model, choice))
        for context in contexts:
            stack.enter_context(context)
        return run_condition(model, tokenizer, evalset, config.batch_size, desc=desc, word=config.word)


METRIC_KEYS = ("accuracy", "mean_response_tokens", "wait_rate", "wait_per_1k_tokens")


def summary_rows(results: dict) -> dict[str, dict]:
    """Notebook 06's summary table, one row per condition (adapter, the output group and both groups ablated, the
    random control's mean, each steering of the target): ``METRIC_KEYS`` and the 95% intervals on the hesitation
    rate and the response length."""
    rows = {"adapter": results["adapter"], "ablated: output": results.get("ablated_output"),
            "ablated: both groups": results["ablated"], "random control (mean)": results["random_control"]}
    rows = {k: v for k, v in rows.items() if v is not None}
    rows.update({k: v for k, v in results["steered"].items() if k != "notes"})
    return {k: {**{m: v[m] for m in METRIC_KEYS},
                **{f"{m} 95%": v.get(f"{m}_ci") for m in ("wait_per_1k_tokens", "mean_response_tokens")}}
            for k, v in rows.items()}


def example_responses(evalset: EvalSet, generations: dict, transfer_scale: float, n: int = 3,
                      width: int = 300) -> str:
    """The first ``n`` problems with their answers and each main condition's response (its first ``width``
    characters), for reading beside the numbers."""
    names = ("adapter", "ablated_output", "ablated", "random_0", "hybrid", "hybrid_plus_features", "target",
             f"target_steered_{transfer_scale:g}")
    lines = []
    for i in range(n):
        lines.append(f"{evalset.items[i].question} answer {evalset.items[i].answer}")
        lines += [f"  {name:>22}:{generations[name].responses[i][:width]}" for name in names if name in generations]
    return "\n".join(lines)


def summarize_draws(draws: list[dict]) -> dict:
    """Random-control draws: the mean of each metric, its spread (sample std, "<key>_std") and every draw."""
    if not draws:
        raise ValueError("no random-control draws to summarize")
    summary = {}
    for key in METRIC_KEYS:
        values = torch.tensor([d[key] for d in draws], dtype=torch.float64)
        summary[key] = values.mean().item()
        summary[f"{key}_std"] = values.std().item() if len(draws) > 1 else 0.0
    return {**summary, "n_draws": len(draws), "draws": draws}


def ablation_checks(results: dict) -> dict:
    """The paper's necessity claim as checks: ablation cuts "wait" per 1k tokens at least in half and shortens
    responses; the random control (mean over draws) does neither (docs/method.md)."""
    adapter, ablated, control = results["adapter"], results["ablated"], results["random_control"]
    hesitates = adapter["wait_per_1k_tokens"] > 0
    return {
        "adapter model hesitates (wait per 1k tokens > 0)": hesitates,
        "ablation halves wait per 1k tokens":
            hesitates and ablated["wait_per_1k_tokens"] <= 0.5 * adapter["wait_per_1k_tokens"],
        "ablation shortens responses": ablated["mean_response_tokens"] < adapter["mean_response_tokens"],
        "random control does not halve wait per 1k tokens":
            control["wait_per_1k_tokens"] > 0.5 * adapter["wait_per_1k_tokens"],
        "random control shortens less than the ablation":
            adapter["mean_response_tokens"] - control["mean_response_tokens"]
            < adapter["mean_response_tokens"] - ablated["mean_response_tokens"],
    }


# ------------------------------------------------------------------------------------------- the experiment
@dataclass
class AblationConfig:
    """Settings of notebook 06's experiment."""

    word: str
    """The pair's hesitation word (``Pair.hesitation_word``), counted per 1,000 response tokens."""
    n_random_draws: int = 5
    """Random-control draws (each as many features per layer as the ablated set, disjoint from it)."""
    random_seed: int = 0
    """Seed of the first draw; draw i uses random_seed + i."""
    transfer_scales: tuple[float, ...] = (-0.5,)
    """Scales of the transfer steering in the target (the paper: negated decoder x 0.5, i.e. -0.5)."""
    batch_size: int = 100
    """Prompts per generate call."""
    groups: bool = True
    """Also the per-group conditions: ablating the output group alone, adding template / output alone to the hybrid."""
    clamped: bool = False
    """Also the clamped variants (features that are off set to their mean active value) of the adapter model and of
    the hybrid with the features added."""

    def __post_init__(self):
        if self.n_random_draws < 1:
            raise ValueError(f"AblationConfig.n_random_draws must be >= 1, got {self.n_random_draws}")
        if self.batch_size < 1:
            raise ValueError(f"AblationConfig.batch_size must be >= 1, got {self.batch_size}")
        self.transfer_scales = tuple(float(s) for s in self.transfer_scales)


def study_sets(feature_sets: dict[str, FeatureSet]) -> dict[str, FeatureSet]:
    """The sets notebook 06 works with, from 05's groups: "output", "template" and "both" (their union: the
    paper's two groups; suppressors, which lower the word, are left out). Without groups (the fallback selector)
    "both" is every chosen feature."""
    output, template = feature_sets.get("output", {}), feature_sets.get("template", {})
    both = union(output, template) if n_chosen(output) + n_chosen(template) else feature_sets["all"]
    return {"output": output, "template": template, "both": both}


def run_ablation_study(model, tokenizer, evalset: EvalSet, feature_sets: dict[str, FeatureSet], stats: FeatureStats,
                       config: AblationConfig) -> tuple[dict, dict[str, Generation]]:
    """Every condition of experiment 6 on one spliced adapter model (``model``: a trained adapter run from
    ``tdlib.runs.load_named``, whose MLP choice selects adapter model / hybrid / target), generating on
    ``evalset`` (``tdlib.problems.pair_benchmark``: its items and generation budget).

    ``feature_sets``: {"all": the hesitation features, optional "output" / "template" / "suppressor": 05's groups}.
    Conditions (the paper's design): the adapter model; ablated: the output group alone ("ablated_output") and both
    groups ("ablated"); random sets of the same size per layer as both groups (``n_random_draws`` seeded draws); the
    hybrid, and the hybrid with the template group, the output group and both added; the target, and the target
    steered by both groups' decoder directions at each transfer scale. Every hesitation rate and mean length
    carries a 95% bootstrap interval over responses. Returns the results (the 06_ablation.json layout, without
    "config") and the generations by condition name.
    """
    sets = study_sets(feature_sets)
    chosen = sets["both"]
    if n_chosen(chosen) == 0:
        raise ValueError("the hesitation feature set is empty; nothing to ablate")
    per_group = config.groups and n_chosen(sets["output"]) > 0 and n_chosen(sets["template"]) > 0
    values = stats.clamp_values(chosen)
    n_features = next(iter(chosen_adapters(model, chosen).values())).config.n_features
    generations: dict[str, Generation] = {}

    def measure(name, choice, *contexts):
        metrics, generations[name] = run_under(model, tokenizer, evalset, choice, contexts, config, desc=name)
        return metrics

    results = {"adapter": measure("adapter", "adapter")}
    if per_group:
        results["ablated_output"] = measure("ablated_output", "adapter", ablate_features(model, sets["output"]))
    results["ablated"] = measure("ablated", "adapter", ablate_features(model, chosen))
    draws, seeds = [], []
    for i in range(config.n_random_draws):
        seed = config.random_seed + i
        control = random_features(chosen, n_features, seed, alive={l: stats.alive(l) for l in chosen})
        draws.append({**measure(f"random_{seed}", "adapter", ablate_features(model, control)), "seed": seed})
        seeds.append(seed)
    results["random_control"] = {**summarize_draws(draws), "seeds": seeds, "pool": "features alive on held-out text"}
    steered = {"hybrid": measure("hybrid", "base")}
    if per_group:
        for group in ("template", "output"):
            steered[f"hybrid_plus_{group}"] = measure(f"hybrid_plus_{group}", "base",
                                                      add_feature_directions(model, sets[group]))
    steered["hybrid_plus_features"] = measure("hybrid_plus_features", "base", add_feature_directions(model, chosen))
    if config.clamped:
        steered["adapter_clamped"] = measure("adapter_clamped", "adapter", clamp_features(model, chosen, values))
        steered["hybrid_plus_features_clamped"] = measure("hybrid_plus_features_clamped", "base",
                                                          add_feature_directions(model, chosen, values=values))
    steered["target"] = measure("target", "target")
    for scale in config.transfer_scales:
        name = f"target_steered_{scale:g}"
        steered[name] = {**measure(name, "target", add_feature_directions(model, chosen, scale=scale)),
                         "scale": scale}
    steered["notes"] = {
        "hybrid_plus_features": "hybrid (base MLPs) + both groups' decoder contribution, activations from the adapter "
                                "encoder on the hybrid's own MLP inputs (no b_dec); hybrid_plus_<group>: one group",
        "adapter_clamped": "adapter model; chosen features set to their mean nonzero held-out activation on every "
                           "token where they are off",
        "hybrid_plus_features_clamped": "as hybrid_plus_features, features that are off clamped as in "
                                        "adapter_clamped",
        "target_steered": "target + scale x both groups' decoder contribution, activations from the adapter encoder "
                          "on the target's MLP inputs (the paper's transfer: scale -0.5)",
    }
    results["steered"] = steered
    results.update({
        "benchmark": evalset.benchmark, "n_problems": len(evalset.items), "n_features_chosen": n_chosen(chosen),
        "set_sizes": {name: n_chosen(fs) for name, fs in {**sets, "suppressor": feature_sets.get("suppressor", {}),
                                                          "all": feature_sets["all"]}.items()},
        "n_features_total": n_features * anatomy(model).n_layers,
        "features_by_layer": {str(k): len(v) for k, v in chosen.items()},
        "clamp_values_mean": float(torch.tensor([v for row in values.values() for v in row]).mean()),
        "n_chosen_never_fired": int(sum((stats.fire_count[l][fs] == 0).sum() for l, fs in chosen.items())),
        "max_new_tokens": evalset.max_new_tokens, "hesitation_word": config.word, "paper": hesitation_reference(),
        "intervals": "95% bootstrap over responses (1,000 resamples) on every rate and mean length",
    })
    results["checks"] = ablation_checks(results)
    return results, generations


def ablation_results(results: dict, *, adapter_model: str, feature_source: str, feature_sets: dict[str, FeatureSet],
                     attribution: dict | None, stats: FeatureStats, stats_batches: int, stats_batch_size: int,
                     mechanisms: dict | None, decision_study: dict | None, decision_study_skipped: str | None,
                     evalset: EvalSet, n_selection_problems: int, seconds: float) -> dict:
    """``06_ablation.json`` (without ``config``): ``run_ablation_study``'s results, then the features and where they
    came from, the statistics behind the fallback and the clamps, the organism's per-mechanism study, the
    pre-registered decision study (or why it was skipped) and which problems were evaluated."""
    from_attribution = feature_source == "05_attribution"
    return {**results, "adapter_model": adapter_model, "feature_source": feature_source,
            "features": as_entries(feature_sets["all"]),
            "attribution_mode": attribution.get("mode") if from_attribution else None,
            "selection_rule": attribution.get("selection_rule") if from_attribution else None,
            "groups": {g: n_chosen(fs) for g, fs in feature_sets.items() if g != "all"},
            "feature_stats": {"n_pre_wait_positions": stats.n_pre_wait, "n_tokens": stats.n_tokens,
                              "batches": stats_batches, "batch_size": stats_batch_size},
            "accuracy_change_ablated": results["ablated"]["accuracy"] - results["adapter"]["accuracy"],
            "mechanisms": mechanisms, "decision_study": decision_study,
            "decision_study_skipped": decision_study_skipped,
            "evaluation": {"selection_problems": n_selection_problems, "evaluated_problems": len(evalset.items),
                           "first_evaluated": evalset.items[0].id},
            "seconds": round(seconds, 1)}
