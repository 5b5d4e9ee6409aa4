"""Classification of scored units in two levels, language / domain / reasoning / uninterpretable and then, for
reasoning units, a mechanism (output / input_simple / input_abstract), and the organism's ground-truth check.

The back end judges each unit (``backend.classify``): the LLM judge reads the explanation and examples; the
offline back end applies ``backends.classify_by_segments`` (on the organism: plurality of activation mass in
``check`` segments -> reasoning, ``step`` -> domain, prompt/answer/eos -> language; detection below the
threshold -> uninterpretable).

Ground truth: distillation added the ``step`` and ``check`` segments (``segments.ADDED_BY_DISTILLATION``);
hesitation + re-check (``check``) is the reasoning behaviour. ``ground_truth_check`` reports, per kind, how much
of the scored units' activation mass lies in added segments against those segments' share of tokens
(``enrichment_*`` = mass share / token share; 1 = no preference), and how reasoning-classified units sit in
``check`` segments.
"""
from __future__ import annotations

import math

import pandas as pd

from .backends import CATEGORIES, FEATURE_ROLES, ClassifyJob, Context, MechanismJob
from .cache import ActivationCache
from .segments import ADDED_BY_DISTILLATION, SEGMENTS


def classify_units(table: pd.DataFrame, cache: ActivationCache, backend, n_examples: int = 5,
                   promoted: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """``table`` with the two levels of the classification: ``category`` (language / domain / reasoning /
    uninterpretable; None where the back end gave no usable answer) and, for reasoning units, ``mechanism``
    (``backends.FEATURE_ROLES``: output / input_simple / input_abstract; None for the others). ``promoted``: unit
    name -> the tokens its output direction promotes most (``page.logit_effects``), shown to the judge."""
    promoted = promoted or {}
    jobs, examples_by_unit = [], {}
    for row in table.itertuples():
        shares = {name: getattr(row, f"mass_{name}") for name in SEGMENTS}
        has_segments = any(v == v for v in shares.values())
        examples = [Context(cache.strings(e.tokens), e.center, e.acts)
                    for e in cache.examples(row.kind, row.layer, row.unit, "top")[:n_examples]]
        examples_by_unit[row.name] = examples
        jobs.append(ClassifyJob(row.name, row.explanation or "", examples, float(row.detection),
                                shares if has_segments else None, tuple(promoted.get(row.name, ()))))
    out = table.copy()
    out["category"] = backend.classify(jobs)
    reasoning = out.index[out["category"] == "reasoning"]
    mechanisms = backend.mechanism([MechanismJob(out.at[i, "name"], examples_by_unit[out.at[i, "name"]],
                                                 list(promoted.get(out.at[i, "name"], ()))) for i in reasoning])
    out["mechanism"] = None
    for i, label in zip(reasoning, mechanisms):
        out.at[i, "mechanism"] = label
    return out


def category_shares(table: pd.DataFrame) -> dict:
    """{kind: {category: share of classified units, "n_classified", "mechanisms": {label: share of the labelled
    reasoning units}, "n_mechanism_labelled"}}."""
    shares = {}
    for kind, group in table.groupby("kind", sort=False):
        classified = group["category"].dropna()
        shares[kind] = {c: float((classified == c).mean()) if len(classified) else math.nan for c in CATEGORIES}
        shares[kind]["n_classified"] = int(len(classified))
        labelled = group["mechanism"].dropna() if "mechanism" in group else pd.Series(dtype=object)
        shares[kind]["mechanisms"] = {m: float((labelled == m).mean()) if len(labelled) else math.nan
                                      for m in FEATURE_ROLES}
        shares[kind]["n_mechanism_labelled"] = int(len(labelled))
    return shares


def ground_truth_check(table: pd.DataFrame, cache: ActivationCache) -> dict:
    """Where the scored units fire relative to what distillation added (organism only; {} otherwise)."""
    total = float(cache.seg_tokens.sum())
    if total == 0:
        return {}
    token_share = {name: float(cache.seg_tokens[i]) / total for i, name in enumerate(SEGMENTS)}
    added_columns = [f"mass_{s}" for s in ADDED_BY_DISTILLATION]
    result = {"token_share": token_share,
              "token_share_added": sum(token_share[s] for s in ADDED_BY_DISTILLATION)}
    for kind, group in table.groupby("kind", sort=False):
        added = group[added_columns].sum(axis=1)
        plurality = group[[f"mass_{s}" for s in SEGMENTS]].idxmax(axis=1).str.removeprefix("mass_")
        reasoning = group[group["category"] == "reasoning"]
        result[kind] = {
            "mean_mass_share": {s: float(group[f"mass_{s}"].mean()) for s in SEGMENTS},
            "mean_mass_share_added": float(added.mean()),
            "enrichment_added": float(added.mean()) / result["token_share_added"],
            "enrichment_check": float(group["mass_check"].mean()) / token_share["check"]
            if token_share["check"] else math.nan,
            "share_units_mostly_added": float((added > 0.5).mean()),
            "share_units_plurality_check": float((plurality == "check").mean()),
            "reasoning_mean_mass_check": float(reasoning["mass_check"].mean()) if len(reasoning) else math.nan,
        }
    return result
