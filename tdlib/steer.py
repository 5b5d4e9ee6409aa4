"""Ablation and steering with adapter features inside plain ``model.generate`` (notebook 06; docs/method.md).

Every intervention is a PyTorch forward hook installed by a context manager (removed on exit, also after an
error), so generation runs at full speed with no per-step Python loop:

* ``ablate_features``: the adapter model with chosen features set to zero (necessity). Hook on each layer's
  ``adapter.features`` identity, so everything downstream (the decoder, later layers) sees the zeros.
* ``clamp_features``: the adapter model with chosen features set to a typical active value on every token
  where they are off (activation <= 0); where a feature fires on its own its value is kept (sufficiency).
* ``add_feature_directions``: adds ``scale * acts @ W_dec[:, features].T`` to a layer's MLP output, with the
  features' activations computed by the adapter's encoder on that MLP's own input (optionally clamped as
  above). Two uses: sufficiency in the hybrid (the spliced model with MLP choice "base": adapters present but
  unused; scale +1) and transfer steering in the target itself (choice "target" or a plain model; the paper's
  negated decoder scaled by 0.5, i.e. scale -0.5). The adapter's bias ``b_dec`` is never added: only the
  chosen features' contribution.

Feature sets are ``{layer: [feature, ...]}``. They come from notebook 05's attribution
(``features_from_attribution``) or, when 05 has not run, from ``select_hesitation_features``: a simple,
clearly labelled fallback that ranks features by how much more they fire right before a "wait" token than
elsewhere on held-out reasoning traces.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import torch

from .bench import count_hesitations, evaluate_items
from .problems import EvalSet
from .generate import Generation
from .models import find_layers, get_mlp
from .organism import task
from .residual import capture_features
from .splice import SplicedMLP, mlp_choice, write_site

FeatureSet = dict[int, list[int]]
FALLBACK_SOURCE = "fallback: features most selectively active right before 'wait' (05_attribution.json missing)"


# The paper's numbers (arXiv 2602.20904, section on hesitation; docs/method.md), "wait" per 1,000 response tokens
# and mean response length in tokens; recorded in 06_ablation.json beside ours.
PAPER = {
    "adapter_wait_per_1k": 5.5, "ablated_output_wait_per_1k": 1.5, "ablated_both_wait_per_1k": 0.5,
    "adapter_response_tokens": 7800, "ablated_response_tokens": 3500,
    "hybrid_plus_template_wait_per_1k": 0.2, "hybrid_plus_output_wait_per_1k": 1.5,
    "hybrid_plus_both_wait_per_1k": 8.2,
}


# ----------------------------------------------------------------------------------------------- feature sets
def features_by_layer(entries: Iterable) -> FeatureSet:
    """``{layer: sorted features}`` from (layer, feature) pairs or dicts with "layer" and "feature"."""
    grouped: dict[int, set[int]] = {}
    for entry in entries:
        layer, feature = (entry["layer"], entry["feature"]) if isinstance(entry, Mapping) else entry
        grouped.setdefault(int(layer), set()).add(int(feature))
    return {layer: sorted(features) for layer, features in sorted(grouped.items())}


def n_chosen(features: FeatureSet) -> int:
    return sum(len(v) for v in features.values())


def as_entries(features: FeatureSet) -> list[dict]:
    return [{"layer": layer, "feature": f} for layer, fs in sorted(features.items()) for f in fs]


def features_from_attribution(attribution: dict) -> dict[str, FeatureSet]:
    """Notebook 05's ``features`` list as {"all": every feature, <group>: that group's features}."""
    entries = attribution.get("features")
    if not entries:
        raise ValueError("05_attribution.json has no 'features' list [{layer, feature, group, influence}]; "
                         "rerun notebooks/05_attribution.ipynb")
    sets = {"all": features_by_layer(entries)}
    for group in sorted({e.get("group") for e in entries if e.get("group")}):
        sets[group] = features_by_layer(e for e in entries if e.get("group") == group)
    return sets


def _check_features(model, features: FeatureSet) -> dict[int, "torch.nn.Module"]:
    """The adapters of the layers ``features`` names; clear errors for missing adapters or bad indices."""
    n_layers = len(find_layers(model))
    adapters = {}
    for layer, chosen in features.items():
        if not 0 <= layer < n_layers:
            raise ValueError(f"feature set names layer {layer} but the model has {n_layers} layers")
        adapter = getattr(get_mlp(model, layer), "adapter", None)
        if adapter is None:
            raise ValueError(f"layer {layer} has no adapter; load an adapter run (tdlib.runs.load_named)")
        _check_indices(layer, chosen, adapter.config.n_features)
        adapters[layer] = adapter
    return adapters


def _check_indices(layer: int, chosen: list[int], n_features: int) -> None:
    bad = [f for f in chosen if not 0 <= f < n_features]
    if bad:
        raise ValueError(f"layer {layer}: features {bad[:5]} outside 0..{n_features - 1}")


# ---------------------------------------------------------------------------------------------------- hooks
@contextmanager
def _hooks(handles_factory):
    handles = []
    try:
        handles_factory(handles)
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _edit_features(model, features: FeatureSet, make_edit):
    """Within the context, each layer's adapter feature activations pass through ``make_edit(layer, chosen,
    index, adapter)``, a function of the activations (``index``: the chosen features as a tensor on the adapter's
    device); layers with no chosen feature are left alone. The edit of ``ablate_features`` and
    ``clamp_features``."""
    adapters = _check_features(model, features)

    def install(handles):
        for layer, chosen in features.items():
            if not chosen:
                continue
            adapter = adapters[layer]
            edit = make_edit(layer, chosen, torch.tensor(chosen, device=adapter.W_enc.device), adapter)
            handles.append(adapter.features.register_forward_hook(
                lambda module, args, output, edit=edit: edit(output)))

    with _hooks(install):
        yield model


def ablate_features(model, features: FeatureSet):
    """Within the context, the chosen adapter features read zero on every token (the adapter model only)."""
    return _edit_features(model, features,
                          lambda layer, chosen, index, adapter: lambda acts: acts.index_fill(-1, index, 0.0))


def _values_for(layer: int, chosen: list[int], values, reference: torch.Tensor) -> torch.Tensor:
    """Per-feature clamp values for one layer: a number for all, or {layer: [value per chosen feature]}."""
    if isinstance(values, (int, float)):
        row = [float(values)] * len(chosen)
    else:
        row = values[layer]
        row = row.tolist() if isinstance(row, torch.Tensor) else list(row)
        if len(row) != len(chosen):
            raise ValueError(f"layer {layer}: {len(row)} clamp values for {len(chosen)} features")
    return torch.tensor(row, dtype=reference.dtype, device=reference.device)


def _clamp_where_off(acts: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.where(acts > 0, acts, value)


def clamp_features(model, features: FeatureSet, values):
    """Within the context, each chosen feature reads ``value`` on every token where it is off (activation <= 0)
    and keeps its own activation where it fires. ``values``: one number, or {layer: [value per feature]}."""

    def clamp(layer, chosen, index, adapter):
        value = _values_for(layer, chosen, values, adapter.W_enc)
        return lambda acts: acts.index_copy(-1, index, _clamp_where_off(acts.index_select(-1, index), value))

    return _edit_features(model, features, clamp)


def feature_contribution(adapter, x: torch.Tensor, chosen: torch.Tensor, values: torch.Tensor | None = None):
    """The chosen features' decoder contribution ``acts @ W_dec[:, chosen].T`` at MLP input ``x`` (no b_dec);
    with ``values``, features that are off are clamped to them."""
    acts = torch.relu(x @ adapter.W_enc[chosen].T + adapter.b_enc[chosen])
    if values is not None:
        acts = _clamp_where_off(acts, values)
    return acts @ adapter.W_dec[:, chosen].T


def _placement(model, adapters) -> str:
    """Where the adapters add their output: recorded with them (``AdapterSet.meta``) or set in the splice."""
    if adapters is not None:
        return adapters.meta.get("placement", "mlp_output")
    return getattr(get_mlp(model, 0), "placement", "mlp_output")


@contextmanager
def add_feature_directions(model, features: FeatureSet, scale: float = 1.0, values=None, adapters=None):
    """Within the context, each named layer's MLP output gains ``scale`` x the chosen features' decoder
    contribution, their activations computed by the adapter encoder on that MLP's input (adapters placed on the
    residual stream, ``tdlib.models.PLACEMENTS``, add it after the block's post-MLP norm instead).

    For the hybrid (spliced model, choice "base") with scale 1 this adds the features to the base MLPs; for the
    target (choice "target", or a plain model with ``adapters`` given) scale -0.5 is the paper's transfer
    steering. ``values`` clamps off features as in ``clamp_features``. Layers running their adapter (choice
    "adapter") are refused: the features are already there; use ``clamp_features``/``ablate_features``.
    """
    modules = {}
    for layer, chosen in features.items():
        mlp = get_mlp(model, layer)
        adapter = adapters[layer] if adapters is not None else getattr(mlp, "adapter", None)
        if adapter is None:
            raise ValueError(f"layer {layer} has no adapter: pass adapters= (tdlib.runs.load_adapters) for a "
                             "plain model, or use a spliced adapter run")
        if isinstance(mlp, SplicedMLP) and mlp.choice == "adapter":
            raise ValueError(f"layer {layer} runs its adapter already; add_feature_directions is for the hybrid or "
                             "the target (mlp_choice 'base' or 'target'); use clamp_features for the adapter model")
        _check_indices(layer, chosen, adapter.config.n_features)
        modules[layer] = (mlp, adapter)

    def hook(module, args, output, adapter, index, value):
        return output + scale * feature_contribution(adapter, args[0], index, value)

    placement = _placement(model, adapters)

    def install(handles):
        if scale == 0:
            return
        for layer, chosen in features.items():
            if not chosen:
                continue
            mlp, adapter = modules[layer]
            index = torch.tensor(chosen, device=adapter.W_enc.device)
            value = None if values is None else _values_for(layer, chosen, values, adapter.W_enc)
            site = write_site(model, layer, placement)
            if site is mlp:
                handles.append(mlp.register_forward_hook(
                    lambda module, args, output, adapter=adapter, index=index, value=value:
                    hook(module, args, output, adapter, index, value)))
                continue
            # placement "residual": the features write after the block's post-MLP norm, read the MLP's input
            inputs = {}
            handles.append(mlp.register_forward_pre_hook(lambda module, args, inputs=inputs:
                                                         inputs.__setitem__("x", args[0])))
            handles.append(site.register_forward_hook(
                lambda module, args, output, adapter=adapter, index=index, value=value, inputs=inputs:
                output + scale * feature_contribution(adapter, inputs.pop("x"), index, value)))

    with _hooks(install):
        yield model


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


def fallback_count(n_features_total: int, share: float = 0.0245) -> int:
    """How many features the fallback selects: the paper's hesitation share (2.45% of all features)."""
    return max(1, math.ceil(share * n_features_total))


def random_features(chosen: FeatureSet, n_features: int, seed: int,
                    alive: Mapping[int, torch.Tensor] | None = None) -> FeatureSet:
    """A random control: per layer, as many features as ``chosen`` has there, none of them chosen, drawn with
    ``seed``. With ``alive`` ({layer: bool mask}), drawn only from features that fire on held-out text (dead
    features would make the control trivially harmless); if a layer has too few, the rest come from dead ones."""
    generator = torch.Generator().manual_seed(seed)
    drawn = {}
    for layer, features in sorted(chosen.items()):
        taken = set(features)
        order = torch.randperm(n_features, generator=generator).tolist()
        candidates = [f for f in order if f not in taken]
        if alive is not None:
            mask = alive[layer]
            candidates = [f for f in candidates if mask[f]] + [f for f in candidates if not mask[f]]
        if len(candidates) < len(features):
            raise ValueError(f"layer {layer}: cannot draw {len(features)} random features disjoint from the "
                             f"{len(taken)} chosen among {n_features}")
        drawn[layer] = sorted(candidates[:len(features)])
    return drawn


# ----------------------------------------------------------------------------------------------- measuring
def wait_metrics(generation: Generation, word: str = task.HESITATION, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Hesitation counts beside the accuracy metrics: the pair's hesitation ``word`` (as a word, any case) per 1,000
    response tokens (the paper's metric) and the total count, with 95% intervals on the rate and on the mean
    response length from a bootstrap over responses."""
    from .faithfulness import bootstrap_ratio

    waits = np.array([count_hesitations(r, word) for r in generation.responses], dtype=float)
    tokens = np.array(generation.response_tokens, dtype=float)
    rate = bootstrap_ratio(1000 * waits, tokens, n_bootstrap, seed)
    length = bootstrap_ratio(tokens, np.ones_like(tokens), n_bootstrap, seed)
    return {"wait_per_1k_tokens": float(1000 * waits.sum() / max(tokens.sum(), 1)), "wait_per_1k_tokens_ci": list(rate),
            "mean_response_tokens_ci": list(length), "n_wait": int(waits.sum())}


def run_condition(model, tokenizer, evalset: EvalSet, batch_size: int = 100, desc: str = "generate",
                  word: str = task.HESITATION) -> tuple[dict, Generation]:
    """Greedy generation on ``evalset`` under whatever hooks/choice are active; accuracy, length and hesitation."""
    metrics, generation, _ = evaluate_items(model, tokenizer, evalset.items, benchmark=evalset.benchmark,
                                            max_new_tokens=evalset.max_new_tokens, batch_size=batch_size, desc=desc,
                                            prompt_format=evalset.prompt_format, hesitation_word=word)
    return {**metrics, **wait_metrics(generation, word)}, generation


METRIC_KEYS = ("accuracy", "mean_response_tokens", "wait_rate", "wait_per_1k_tokens")


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

    n_random_draws: int = 5
    """Random-control draws (each as many features per layer as the ablated set, disjoint from it)."""
    random_seed: int = 0
    """Seed of the first draw; draw i uses random_seed + i."""
    transfer_scales: tuple[float, ...] = (-0.5,)
    """Scales of the transfer steering in the target (the paper: negated decoder x 0.5, i.e. -0.5)."""
    batch_size: int = 100
    """Prompts per generate call."""
    word: str = task.HESITATION
    """The pair's hesitation word, counted per 1,000 response tokens."""
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


def union(*sets: FeatureSet) -> FeatureSet:
    """The features of every set, by layer."""
    return features_by_layer((layer, f) for features in sets for layer, fs in features.items() for f in fs)


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
    n_features = next(iter(_check_features(model, chosen).values())).config.n_features
    generations: dict[str, Generation] = {}

    def measure(name, choice, *contexts):
        from contextlib import ExitStack

        with ExitStack() as stack:
            stack.enter_context(mlp_choice(model, choice))
            for context in contexts:
                stack.enter_context(context)
            metrics, generations[name] = run_condition(model, tokenizer, evalset, config.batch_size, desc=name,
                                                       word=config.word)
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
        "n_features_total": n_features * len(find_layers(model)),
        "features_by_layer": {str(k): len(v) for k, v in chosen.items()},
        "clamp_values_mean": float(torch.tensor([v for row in values.values() for v in row]).mean()),
        "n_chosen_never_fired": int(sum((stats.fire_count[l][fs] == 0).sum() for l, fs in chosen.items())),
        "max_new_tokens": evalset.max_new_tokens, "hesitation_word": config.word, "paper": PAPER,
        "intervals": "95% bootstrap over responses (1,000 resamples) on every rate and mean length",
    })
    results["checks"] = ablation_checks(results)
    return results, generations


# ------------------------------------------------------------- per planted mechanism (the organism's benchmark)
def mechanism_metrics(generation: Generation, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Per planted mechanism (``tdlib.organism.mechanisms``): its behaviour (a hesitation at its decision points;
    for the distractor, the answer's period) per 1,000 response tokens, with a 95% bootstrap interval over
    responses; beside accuracy-free totals (mean response tokens)."""
    from .faithfulness import bootstrap_ratio
    from .organism.mechanisms import hesitations_by_mechanism

    counts = [hesitations_by_mechanism(r) for r in generation.responses]
    tokens = np.array(generation.response_tokens, dtype=float)
    out = {}
    for mechanism in counts[0] if counts else ():
        values = np.array([c[mechanism] for c in counts], dtype=float)
        out[mechanism] = {"per_1k_tokens": float(1000 * values.sum() / max(tokens.sum(), 1)),
                          "per_1k_tokens_ci": list(bootstrap_ratio(1000 * values, tokens, n_bootstrap, seed)),
                          "count": int(values.sum())}
    return out


def mechanism_study(model, tokenizer, evalset: EvalSet, mechanism_sets: dict[str, FeatureSet], stats: FeatureStats,
                    config: AblationConfig, reference: dict[str, Generation] | None = None) -> dict:
    """Necessity and sufficiency per planted mechanism: for each mechanism's feature set (notebook 05), the adapter
    model with the set ablated, ``config.n_random_draws`` random sets of the same size per layer ablated, and the
    hybrid with the set added; every condition's per-mechanism rates (``mechanism_metrics``), accuracy and length.
    ``reference``: ``run_ablation_study``'s generations by condition name: "adapter" and "hybrid" are reused, and
    for the ``hesitation`` set (its "both" groups, the set it ablates) its ablated, random and hybrid-plus
    conditions too (the same seeds, so the same random sets)."""
    from contextlib import ExitStack

    reference = dict(reference or {})

    def measure(name, choice, *contexts, reuse=None):
        reuse = reuse or (name if not contexts else None)
        if reuse in reference:  # the same condition already generated by run_ablation_study
            from .bench import score_responses
            from .problems import check_organism_response

            generation = reference[reuse]
            metrics = score_responses([check_organism_response(i, r) for i, r in zip(evalset.items,
                                                                                    generation.responses)],
                                      generation, config.word)
        else:
            with ExitStack() as stack:
                stack.enter_context(mlp_choice(model, choice))
                for context in contexts:
                    stack.enter_context(context)
                metrics, generation = run_condition(model, tokenizer, evalset, config.batch_size, desc=name,
                                                    word=config.word)
        return {**{k: metrics[k] for k in ("accuracy", "mean_response_tokens")},
                "mechanisms": mechanism_metrics(generation)}

    out = {"adapter": measure("adapter", "adapter"), "hybrid": measure("hybrid", "base"), "sets": {}}
    for mechanism, chosen in mechanism_sets.items():
        if n_chosen(chosen) == 0:
            continue
        n_features = next(iter(_check_features(model, chosen).values())).config.n_features
        draws, note = [], None
        for i in range(config.n_random_draws):
            try:
                control = random_features(chosen, n_features, config.random_seed + i,
                                          alive={l: stats.alive(l) for l in chosen})
            except ValueError as error:  # a set too large for a disjoint random set of its size (tiny adapters)
                note = str(error)
                break
            same = mechanism == "hesitation"  # run_ablation_study's own set: its generations are reused
            draws.append(measure(f"random_{mechanism}_{i}", "adapter", ablate_features(model, control),
                                 reuse=f"random_{config.random_seed + i}" if same else None))
        same = mechanism == "hesitation"
        out["sets"][mechanism] = {
            "n_features": n_chosen(chosen), "random_note": note,
            "ablated": measure(f"ablated_{mechanism}", "adapter", ablate_features(model, chosen),
                               reuse="ablated" if same else None),
            "random": draws,
            "hybrid_plus": measure(f"hybrid_plus_{mechanism}", "base", add_feature_directions(model, chosen),
                                   reuse="hybrid_plus_features" if same else None),
        }
    for mechanism, entry in out["sets"].items():
        entry["summary"] = mechanism_summary(out, mechanism)
    out["checks"] = mechanism_checks(out)
    return out


def mechanism_summary(study: dict, mechanism: str) -> dict:
    """One set's own-mechanism rates (per 1k tokens) under each condition, and the largest relative change it causes
    in another mechanism when ablated."""
    adapter, hybrid, entry = study["adapter"], study["hybrid"], study["sets"][mechanism]
    others = [m for m in adapter["mechanisms"] if m not in (mechanism, "none", "hesitation")
              and (mechanism != "hesitation" or m == "period") and _rate(adapter, m) > 0]
    changes = [abs(_rate(entry["ablated"], m) / _rate(adapter, m) - 1) for m in others]
    return {"adapter": _rate(adapter, mechanism), "ablated": _rate(entry["ablated"], mechanism),
            "ablated_ci": entry["ablated"]["mechanisms"][mechanism]["per_1k_tokens_ci"],
            "random_mean": float(np.mean([_rate(d, mechanism) for d in entry["random"]])) if entry["random"] else None,
            "hybrid": _rate(hybrid, mechanism), "hybrid_plus": _rate(entry["hybrid_plus"], mechanism),
            "largest_change_elsewhere": max(changes) if changes else None,
            "accuracy_ablated": entry["ablated"]["accuracy"], "accuracy_adapter": adapter["accuracy"],
            "length_ablated": entry["ablated"]["mean_response_tokens"],
            "length_adapter": adapter["mean_response_tokens"]}


def _rate(condition: dict, mechanism: str) -> float:
    return condition["mechanisms"][mechanism]["per_1k_tokens"]


def mechanism_checks(study: dict) -> dict[str, bool]:
    """Per mechanism: ablating its set at least halves its behaviour and leaves every other mechanism within a
    factor 2; random sets (mean) do not halve it; adding the set to the hybrid raises it above the hybrid's."""
    adapter, hybrid = study["adapter"], study["hybrid"]
    checks = {}
    for mechanism, entry in study["sets"].items():
        before = _rate(adapter, mechanism)
        others = [m for m in adapter["mechanisms"] if m not in (mechanism, "none", "hesitation")
                  and (mechanism != "hesitation" or m == "period") and _rate(adapter, m) > 0]
        random_rate = float(np.mean([_rate(d, mechanism) for d in entry["random"]])) if entry["random"] else None
        checks[f"{mechanism}: ablation halves it"] = before > 0 and _rate(entry["ablated"], mechanism) <= 0.5 * before
        checks[f"{mechanism}: ablation leaves the others (within 2x)"] = all(
            0.5 * _rate(adapter, m) <= _rate(entry["ablated"], m) <= 2 * _rate(adapter, m) for m in others)
        checks[f"{mechanism}: random sets do not halve it"] = random_rate is not None and random_rate > 0.5 * before
        checks[f"{mechanism}: added to the hybrid it appears"] = \
            _rate(entry["hybrid_plus"], mechanism) > _rate(hybrid, mechanism)
    return checks
