"""The steps of notebook 04 as functions (so tests reach them): build or load the cache, score, classify,
summarise into the results contract ``results/04_autointerp.json``."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from ..pairs import Pair
from ..runs import RUN_FILE, run_dir
from .cache import ActivationCache, CacheConfig, build_cache, stream_batches
from .classify import category_shares, classify_units, ground_truth_check
from .page import logit_effects
from .scoring import ScoringConfig, score_units, summarize_detection


def cache_dir(pair: Pair, model_name: str) -> Path:
    """``artifacts/autointerp/<pair key>/<model name>/cache``."""
    return pair.artifacts("autointerp") / model_name / "cache"


def run_fingerprint(pair: Pair, model_name: str, root: Path | None = None) -> str | None:
    """A hash of the run's run.json (rewritten whenever the run is trained again), so a retrained adapter
    never reuses a stale cache."""
    path = run_dir(pair, model_name, root) / RUN_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None


def cached_or_built(pair: Pair, model_name: str, model, tokenizer, data, config: CacheConfig,
                    progress: bool = True, root: Path | None = None) -> ActivationCache:
    """Load the cache when one with the same config and the same trained run exists, else stream and save a new
    one (``root``: where the runs live, as in ``tdlib.runs.load_named``)."""
    directory = cache_dir(pair, model_name)
    info = {"name": model_name, "pair": pair.name, "run": run_fingerprint(pair, model_name, root)}
    meta_file = directory / "cache.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta["config"] == json.loads(json.dumps(asdict(config))) and meta.get("model") == info:
            return ActivationCache.load(directory)
    cache = build_cache(model, tokenizer, stream_batches(data, config.n_batches), config, model_info=info,
                        progress=progress)
    cache.save(directory)
    return cache


def score_and_classify(cache: ActivationCache, backend, config: ScoringConfig, model=None,
                       n_promoted: int = 10) -> pd.DataFrame:
    """Score every sampled unit, then classify it in two levels; with ``model``, each unit's ``n_promoted`` most
    promoted tokens (``page.logit_effects``) go to the judge."""
    table = score_units(cache, backend, config)
    promoted = None
    if model is not None:
        effects = logit_effects(model, table, cache.vocab, k=n_promoted)
        promoted = {name: [token for token, _ in effect["up"]] for name, effect in effects.items()}
    return classify_units(table, cache, backend, promoted=promoted)


def summary(table: pd.DataFrame, cache: ActivationCache, backend_name: str, model_name: str,
            cache_config: CacheConfig, scoring_config: ScoringConfig) -> dict:
    """The results contract: {"adapter"|"neuron": {detection_top, detection_uniform, n_scored, ...},
    "reasoning_share", "backend"} plus categories, the ground-truth check and the settings."""
    results = summarize_detection(table)
    categories = category_shares(table)
    for kind, shares in categories.items():
        results[kind]["categories"] = shares
        fires = [cache.records[(k, layer)].fires for k, layer in cache.units if k == kind]
        results[kind]["n_units"] = int(sum(len(f) for f in fires))
        results[kind]["n_fired"] = int(sum(int((f > 0).sum()) for f in fires))
        results[kind]["n_alive"] = int(sum(int((f >= scoring_config.min_fires).sum()) for f in fires))
    adapter = categories.get("adapter", {})
    comparable = backend_name == "llm"
    results.update({
        "comparable_to_paper": comparable,
        "comparability": ("an LLM explainer, scorer and judge, as in the paper" if comparable else
                          f"the {backend_name} back end (pattern explanations, a rule in place of the judge): its "
                          "detection scores and category shares are not comparable with the paper's LLM-judged "
                          "numbers (e.g. its ~8% reasoning features)"),
        "reasoning_share": adapter.get("reasoning", float("nan")),
        "neuron_reasoning_share": categories.get("neuron", {}).get("reasoning", float("nan")),
        "backend": backend_name,
        "model": model_name,
        "ground_truth": ground_truth_check(table, cache),
        "n_tokens": cache.n_tokens,
        "cache_config": asdict(cache_config),
        "scoring_config": asdict(scoring_config),
    })
    return results
