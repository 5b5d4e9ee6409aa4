"""Detection scoring (notebook 04; docs/method.md, section 4): explain each sampled unit from its
max-activating contexts, then ask the scorer which of a shuffled mix of held-out activating and silent contexts
the explanation fits.

Each context is a window around one marked token; positives are windows whose marked token activates the unit,
negatives windows whose marked token does not (token-level: organism units, target neurons above all, are too
dense for whole windows of 17 tokens to be silent). Per unit and regime the score is the balanced accuracy
(TPR + TNR) / 2 over ``n_test`` positives and as many negatives; chance is 0.5. Two regimes: ``top`` (held-out
max-activating contexts: the explainer sees the even ranks, the scorer the odd ranks) and ``uniform``
(uniformly sampled activating contexts). Negatives are split between explainer and scorer.
Adapter features and target neurons go through exactly the same code.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..plots import MODEL_COLORS
from .backends import Context, DetectJob, ExplainJob
from .cache import ActivationCache, Example
from .segments import SEGMENTS


@dataclass
class ScoringConfig:
    """How many units to score and with how many contexts."""

    units_per_layer: int = 100
    """Alive units sampled per (kind, layer) (the paper: 100 features per layer)."""
    n_explain: int = 10
    """Max-activating contexts shown to the explainer (even ranks of the top contexts)."""
    n_test: int = 5
    """Positives per regime shown to the scorer, with as many silent negatives (the paper: 5 + 5)."""
    min_fires: int = 20
    """A unit counts as alive (sampleable) when it fires on at least this many held-out tokens: the paper's 20
    max-activating examples need 20 activating tokens; rarer units leave 1-2 examples to explain and score."""
    seed: int = 0
    """Seeds the unit sample and the negatives' order."""

    def __post_init__(self):
        for name in ("units_per_layer", "n_explain", "n_test", "min_fires"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ScoringConfig.{name} must be a positive integer, got {getattr(self, name)!r}")


@dataclass
class UnitContexts:
    kind: str
    layer: int
    unit: int
    explain_pos: list[Example]
    explain_neg: list[Example]
    test_top: list[Example]
    test_uniform: list[Example]
    test_neg: list[Example]

    @property
    def name(self) -> str:
        return f"{self.kind}/L{self.layer}/{self.unit}"


def unit_contexts(cache: ActivationCache, kind: str, layer: int, unit: int, config: ScoringConfig) -> UnitContexts:
    top = cache.examples(kind, layer, unit, "top")
    silent = cache.examples(kind, layer, unit, "negative")
    uniform = cache.examples(kind, layer, unit, "uniform")
    return UnitContexts(kind, layer, unit, top[0::2][:config.n_explain], silent[0::2], top[1::2][:config.n_test],
                        uniform[:config.n_test], silent[1::2])


def eligible(contexts: UnitContexts) -> bool:
    """Scorable: at least one positive for the explainer and per regime, and two negatives."""
    return bool(contexts.explain_pos and contexts.test_top and contexts.test_uniform
                and contexts.explain_neg and contexts.test_neg)


def sample_units(cache: ActivationCache, config: ScoringConfig) -> list[UnitContexts]:
    """Up to ``units_per_layer`` scorable units per (kind, layer), drawn uniformly with ``config.seed`` among
    those firing on at least ``config.min_fires`` tokens."""
    rng = random.Random(config.seed)
    chosen = []
    for kind, layer in cache.units:
        n_units = cache.records[(kind, layer)].fires.shape[0]
        fires = cache.records[(kind, layer)].fires
        alive = [u for u in range(n_units) if int(fires[u]) >= config.min_fires]
        rng.shuffle(alive)
        taken = 0
        for unit in alive:
            if taken == config.units_per_layer:
                break
            contexts = unit_contexts(cache, kind, layer, unit, config)
            if eligible(contexts):
                chosen.append(contexts)
                taken += 1
    return chosen


def _context(cache: ActivationCache, example: Example, with_acts: bool) -> Context:
    return Context(cache.strings(example.tokens), example.center, list(example.acts) if with_acts else None)


def balanced_accuracy(predictions: list[bool], labels: list[bool]) -> float:
    positives = [p for p, y in zip(predictions, labels) if y]
    negatives = [p for p, y in zip(predictions, labels) if not y]
    if not positives or not negatives:
        return math.nan
    return (sum(positives) / len(positives) + sum(not p for p in negatives) / len(negatives)) / 2


def score_units(cache: ActivationCache, backend, config: ScoringConfig, progress: bool = True) -> pd.DataFrame:
    """Explain and detection-score every sampled unit; one row per unit (NaN scores where the back end gave
    no usable answer)."""
    units = sample_units(cache, config)
    if not units:
        raise ValueError("no scorable units: every unit is dead, too dense to have silent contexts, or the cache "
                         "is too small; stream more batches (CacheConfig.n_batches)")
    explain_jobs = [ExplainJob(u.name, [_context(cache, e, True) for e in u.explain_pos],
                               [_context(cache, e, False) for e in u.explain_neg]) for u in units]
    explanations = backend.explain(explain_jobs)
    rng = random.Random(config.seed + 1)
    detect_jobs, labels, owners = [], [], []
    for index, (u, explanation) in enumerate(zip(units, explanations)):
        if explanation is None:
            continue
        for regime, positives in (("top", u.test_top), ("uniform", u.test_uniform)):
            negatives = u.test_neg[:len(positives)]
            mixed = [(e, True) for e in positives] + [(e, False) for e in negatives]
            rng.shuffle(mixed)
            detect_jobs.append(DetectJob(u.name, explanation, [_context(cache, e, False) for e, _ in mixed]))
            labels.append([y for _, y in mixed])
            owners.append((index, regime))
    predictions = backend.detect(detect_jobs)
    scores = {}
    for (index, regime), prediction, truth in zip(owners, predictions, labels):
        scores[(index, regime)] = math.nan if prediction is None else balanced_accuracy(prediction, truth)
    rows = []
    for index, (u, explanation) in enumerate(zip(units, explanations)):
        shares = cache.mass_shares(u.kind, u.layer)[u.unit]
        row = {"kind": u.kind, "layer": u.layer, "unit": u.unit, "name": u.name,
               "frequency": float(cache.frequency(u.kind, u.layer)[u.unit]), "explanation": explanation,
               "detection_top": scores.get((index, "top"), math.nan),
               "detection_uniform": scores.get((index, "uniform"), math.nan),
               "n_top": len(u.test_top), "n_uniform": len(u.test_uniform), "n_negative": len(u.test_neg)}
        row.update({f"mass_{name}": float(shares[i]) for i, name in enumerate(SEGMENTS)})
        rows.append(row)
    table = pd.DataFrame(rows)
    table["detection"] = table[["detection_top", "detection_uniform"]].mean(axis=1, skipna=False)
    return table


def mean_ci(values, n_boot: int = 1000, seed: int = 0) -> tuple[float, list[float]]:
    """Mean and a 95% bootstrap interval (NaNs dropped)."""
    values = np.asarray([v for v in values if v == v], dtype=float)
    if len(values) == 0:
        return math.nan, [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    boots = rng.choice(values, (n_boot, len(values))).mean(1)
    return float(values.mean()), [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def summarize_detection(table: pd.DataFrame) -> dict:
    """{kind: {detection_top, detection_top_ci, detection_uniform, detection_uniform_ci, n_scored, n_failed}}."""
    summary = {}
    for kind, group in table.groupby("kind", sort=False):
        entry = {}
        for regime in ("top", "uniform"):
            mean, ci = mean_ci(group[f"detection_{regime}"])
            entry[f"detection_{regime}"], entry[f"detection_{regime}_ci"] = mean, ci
        scored = group["detection"].notna()
        entry["n_scored"] = int(scored.sum())
        entry["n_failed"] = int((~scored).sum())
        entry["n_layers"] = int(group["layer"].nunique())
        summary[kind] = entry
    return summary


def detection_figure(table: pd.DataFrame, backend_name: str = ""):
    """Like the paper's Fig. 5: distributions of detection scores, adapters vs neurons, in the two regimes."""
    import matplotlib.pyplot as plt

    colors = {"adapter": MODEL_COLORS["adapter"], "neuron": MODEL_COLORS["target"]}
    labels = {"adapter": "adapter features", "neuron": "target MLP neurons"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    kinds = list(dict.fromkeys(table["kind"]))
    width = 0.08 / max(len(kinds), 1)
    for axis, regime, title in zip(axes, ("top", "uniform"), ("held-out max-activating", "uniformly sampled")):
        for number, kind in enumerate(kinds):
            values = table.loc[table["kind"] == kind, f"detection_{regime}"].dropna()
            levels = np.round(values * 20) / 20  # scores of a 5 + 5 test are multiples of 0.1 (0.05 if unequal)
            counts = levels.value_counts(normalize=True).sort_index() * 100
            offset = (number - (len(kinds) - 1) / 2) * width
            axis.bar(counts.index + offset, counts.values, width=width, color=colors.get(kind),
                     label=f"{labels.get(kind, kind)} (mean {values.mean():.2f}, n={len(values)})")
            axis.axvline(values.mean(), color=colors.get(kind), linewidth=1.5, linestyle=":")
        axis.axvline(0.5, color="black", linestyle="--", linewidth=1, label="chance (0.5)")
        axis.set(xlabel="detection score (balanced accuracy)", title=f"Detection: {title} examples",
                 xlim=(-0.03, 1.05))
        axis.legend(fontsize=8, loc="best")
    axes[0].set_ylabel("units (%); dotted line = mean")
    fig.suptitle("Autointerp detection scores, adapter features vs target neurons"
                 + (f" ({backend_name} back end)" if backend_name else ""))
    fig.tight_layout()
    return fig
