"""Benchmark evaluation (notebooks 00 and 03): generate, check, score, with intervals.

* ``evaluate_items``: greedy (or sampled, ``tdlib.generate.SamplingConfig``) generation with a token budget, then
  checking (``tdlib.problems``); accuracy with a Wilson 95% interval (pass@1 over samples when sampled), mean
  response length in tokens, the share of responses saying the pair's hesitation word and of responses that hit
  the budget.
* ``recovered_gain``: (acc_model - acc_base) / (acc_target - acc_base), the paper's headline benchmark number;
  undefined (None, with ``recovered_gain_reason``) unless the target's gain over the base is resolved: the lower
  end of its 95% interval (``accuracy_gain``, Newcombe's method from the two Wilson intervals) is above zero.
"""
from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from .generate import Generation, SamplingConfig, generate_greedy, generate_sampled
from .models import IncompatiblePairError, load_tokenizer
from .pairs import ORGANISM
from .problems import BENCHMARKS, BenchItem, EvalSet, benchmark_prompts, check_response
from .runs import load_named

# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------

def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion (sensible at 0 and n, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def count_hesitations(text: str, word: str) -> int:
    """How often ``word`` occurs as a word, any case ("Wait," and " wait" count; "await" does not)."""
    return len(re.findall(rf"(?<![A-Za-z]){re.escape(word.strip())}(?![A-Za-z])", text, flags=re.IGNORECASE))


def score_responses(correct: list[bool], generation: Generation, hesitation: str,
                    max_new_tokens: int | None = None) -> dict:
    """Accuracy (Wilson 95% interval), mean response tokens and the share of responses saying ``hesitation``
    (as a word, any case); with ``max_new_tokens``, also the share of responses that ran into that budget (cut
    before they finished: a truncated answer scores as wrong, and a truncated length understates the model's)."""
    n = len(correct)
    if n == 0:
        raise ValueError("no responses to score")
    successes = sum(bool(c) for c in correct)
    scores = {
        "accuracy": successes / n,
        "accuracy_ci": list(wilson_interval(successes, n)),
        "mean_response_tokens": sum(generation.response_tokens) / n,
        "wait_rate": sum(count_hesitations(r, hesitation) > 0 for r in generation.responses) / n,
        "n_correct": successes,
    }
    if max_new_tokens is not None:
        scores["hit_budget_share"] = sum(t >= max_new_tokens for t in generation.response_tokens) / n
    return scores


def pass_at_1(correct_by_sample: list[list[bool]], n_bootstrap: int = 1000, seed: int = 0) -> tuple[float, list]:
    """pass@1 from k samples per problem (``correct_by_sample[s][i]``: sample s of problem i): the mean over
    samples and problems, with a 95% percentile interval from resampling problems (a problem's samples are not
    independent draws of the benchmark, so a Wilson interval over n x k responses would be too narrow)."""
    per_problem = np.asarray(correct_by_sample, dtype=float).mean(0)
    if per_problem.size == 0:
        raise ValueError("no problems to score")
    rng = np.random.default_rng(seed)
    means = per_problem[rng.integers(0, per_problem.size, size=(n_bootstrap, per_problem.size))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(per_problem.mean()), [float(low), float(high)]


def evaluate_items(model, tokenizer, items: list[BenchItem], *, benchmark: str, max_new_tokens: int,
                   batch_size: int = 64, sampling: SamplingConfig | None = None, desc: str = "generate",
                   prompts: list[str] | None = None, prompt_format: str | None = None,
                   hesitation_word: str = "wait") -> tuple[dict, Generation, list[bool]]:
    """Generate for every item (``sampling.n_samples`` times when sampled), check the answers, score (``wait_rate``
    counts the pair's ``hesitation_word``; ``hit_budget_share`` the responses cut at ``max_new_tokens``). The
    returned generation and correctness list hold every sample, sample after sample.
    ``benchmark="organism"`` uses the organism's own prompts and answer rule; other names are formatted with
    ``render_prompts`` and checked with ``check_response``."""
    kind = BENCHMARKS[benchmark].kind if benchmark in BENCHMARKS else "math"
    if prompts is None:
        prompts = benchmark_prompts(tokenizer, items, benchmark, prompt_format)
    if sampling is None:
        generations = [generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, desc=desc)]
    else:
        generations = [generate_sampled(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                        sampling=replace(sampling, seed=sampling.seed + s), batch_size=batch_size,
                                        desc=desc if sampling.n_samples == 1 else f"{desc} sample {s + 1}")
                       for s in range(sampling.n_samples)]
    if benchmark == "organism":
        by_sample = [[ORGANISM.hooks().check_response(i, r) for i, r in zip(items, g.responses)] for g in generations]
    else:
        by_sample = [[check_response(i, r, kind) for i, r in zip(items, g.responses)] for g in generations]
    generation = Generation([p for g in generations for p in g.prompts], [r for g in generations for r in g.responses],
                            [t for g in generations for t in g.response_tokens])
    correct = [c for sample in by_sample for c in sample]
    scores = score_responses(correct, generation, hesitation_word, max_new_tokens)
    if len(by_sample) > 1:  # pass@1 over the samples, its interval over problems
        scores["accuracy"], scores["accuracy_ci"] = pass_at_1(by_sample)
        scores["n_samples"] = len(by_sample)
    return scores, generation, correct


def recovered_gain(accuracy: float, base_accuracy: float, target_accuracy: float) -> float | None:
    """(acc - acc_base) / (acc_target - acc_base); None when the target does not beat the base (undefined).

    The bare formula: whether the gain is large enough to divide by is ``accuracy_gain``'s question, which
    ``recovered_gains`` asks before calling this."""
    gap = target_accuracy - base_accuracy
    if gap <= 0:
        return None
    return (accuracy - base_accuracy) / gap


def accuracy_gain(base: dict, target: dict) -> dict:
    """The target's accuracy gain over the base with its 95% interval, from the two entries' Wilson intervals
    (``accuracy`` and ``accuracy_ci``, as ``score_responses`` writes them) by Newcombe's hybrid score method:

        gain = p_t - p_b
        low  = gain - sqrt((p_t - l_t)^2 + (u_b - p_b)^2)     (l, u: each accuracy's Wilson 95% interval)
        high = gain + sqrt((u_t - p_t)^2 + (p_b - l_b)^2)

    ``resolved`` is True when ``low > 0``, i.e. the gain is larger than the half-width of its own interval below it;
    only then is a recovered gain (a ratio over this gain) reported."""
    p_t, (l_t, u_t) = target["accuracy"], target["accuracy_ci"]
    p_b, (l_b, u_b) = base["accuracy"], base["accuracy_ci"]
    gain = p_t - p_b
    below = math.sqrt((p_t - l_t) ** 2 + (u_b - p_b) ** 2)
    above = math.sqrt((u_t - p_t) ** 2 + (p_b - l_b) ** 2)
    return {"gain": gain, "gain_ci": [gain - below, gain + above], "half_width": below, "resolved": gain - below > 0,
            "interval": "95%, Newcombe's method from the base's and target's Wilson intervals"}


def recovered_gains(results: dict[str, dict]) -> dict:
    """Add ``recovered_gain`` and ``recovered_gain_reason`` to every entry of ``results`` (which must hold "base" and
    "target"): the gain when ``accuracy_gain`` is resolved (reason None), else None with the reason. Returns the
    ``accuracy_gain`` it used."""
    base, target = results["base"], results["target"]
    gain = accuracy_gain(base, target)
    reason = None
    if not gain["resolved"]:
        reason = (f"undefined: the target's gain over the base ({gain['gain']:+.1%}) is not larger than its 95% "
                  f"interval's half-width ({gain['half_width']:.1%}; interval {gain['gain_ci'][0]:+.1%} to "
                  f"{gain['gain_ci'][1]:+.1%}), so a ratio over it would be noise")
    for entry in results.values():
        entry["recovered_gain"] = None if reason else recovered_gain(entry["accuracy"], base["accuracy"],
                                                                     target["accuracy"])
        entry["recovered_gain_reason"] = reason
    return gain


# ----------------------------------------------------------------------------------------------------------------
# Notebook 03: every model on each of the pair's benchmarks
# ----------------------------------------------------------------------------------------------------------------

def benchmark_model_names(train_results: dict, include_local_mse: bool = True) -> list[str]:
    """base, target, hybrid, each adapter of notebook 01 (by sparsity), the MLP fine-tune skyline (and local MSE)."""
    names = ["base", "target", "hybrid"]
    trained = train_results["models"]
    kinds = {n: trained[n].get("kind") for n in trained}
    names += sorted((n for n in trained if kinds[n] == "adapter"), key=lambda n: -trained[n].get("l1_weight", 0))
    names += [n for n in trained if kinds[n] == "mlp_finetune"]
    if include_local_mse:
        names += [n for n in trained if kinds[n] == "local_mse"]
    return list(dict.fromkeys(names))


class BenchmarkRun(NamedTuple):
    """One benchmark of notebook 03: what it ran on, each model's scores and generations."""

    evalset: EvalSet
    models: dict[str, dict]
    generations: dict[str, Generation]


def run_benchmarks(pair, names: list[str], evalsets: list[EvalSet], *, batch_size: int = 64,
                   sampling: SamplingConfig | None = None, progress: bool = True) -> list[BenchmarkRun]:
    """Evaluate every named model of ``pair`` on every evalset, loading each model once (a 7B load costs more than
    a small benchmark); adds ``recovered_gain`` (and its reason when undefined, ``recovered_gains``) against base
    and target per benchmark."""
    tokenizer = load_tokenizer(pair.target)
    runs = [BenchmarkRun(evalset, {}, {}) for evalset in evalsets]
    for name in tqdm(names, desc="models", disable=not progress):
        model = load_named(pair, name)
        for run in runs:
            evalset = run.evalset
            run.models[name], run.generations[name], _ = evaluate_items(
                model, tokenizer, evalset.items, benchmark=evalset.benchmark, max_new_tokens=evalset.max_new_tokens,
                batch_size=batch_size, sampling=sampling, desc=name if len(runs) == 1 else f"{name} {evalset.benchmark}",
                prompt_format=pair.prompt_format, hesitation_word=pair.hesitation_word)
        del model
    for run in runs:
        if "base" in run.models and "target" in run.models:
            recovered_gains(run.models)
    return runs


def run_benchmark(pair, names: list[str], items: list[BenchItem], *, benchmark: str, max_new_tokens: int,
                  batch_size: int = 64, sampling: SamplingConfig | None = None,
                  progress: bool = True) -> tuple[dict[str, dict], dict[str, Generation]]:
    """``run_benchmarks`` on one benchmark's ``items``: (scores, generations) by model name."""
    evalset = EvalSet(benchmark, items, max_new_tokens, source="", prompt_format=pair.prompt_format)
    (run,) = run_benchmarks(pair, names, [evalset], batch_size=batch_size, sampling=sampling, progress=progress)
    return run.models, run.generations


def benchmark_summary(run: BenchmarkRun, train_results: dict) -> dict:
    """One benchmark's part of ``03_benchmarks.json``: its models' scores, the target's gain over the base and the
    paper's benchmark claims as checks."""
    models = run.models
    target_gain = accuracy_gain(models["base"], models["target"]) if {"base", "target"} <= set(models) else None
    return {"benchmark": run.evalset.benchmark, "source": run.evalset.source, "n_problems": len(run.evalset.items),
            "max_new_tokens": run.evalset.max_new_tokens, "models": models, "target_gain": target_gain,
            "checks": benchmark_checks(models, train_results) if "target" in models else {}}


def target_gain_line(summary: dict) -> str:
    """The target's gain over the base on one benchmark, with its interval and whether recovered gain is defined."""
    gain, models = summary["target_gain"], summary["models"]
    if not gain:
        return f"{summary['benchmark']}: no base/target pair to compare"
    verdict = "reported" if gain["resolved"] else "undefined: " + models["target"]["recovered_gain_reason"]
    return (f"{summary['benchmark']}: target gain over base {gain['gain']:+.1%} (95% interval "
            f"{gain['gain_ci'][0]:+.1%} to {gain['gain_ci'][1]:+.1%}); recovered gain {verdict}")


def benchmark_results(summaries: list[dict], sampling: SamplingConfig | None) -> dict:
    """``03_benchmarks.json``: the first benchmark's summary at the top (the layout every reader uses) and, when
    several ran, each one's under ``by_benchmark``; how responses were decoded and which interval accuracy has."""
    first = summaries[0]
    results = {
        "models": first["models"], "benchmark": first["benchmark"], "n_problems": first["n_problems"],
        "max_new_tokens": first["max_new_tokens"],
        "decoding": ({"sampled": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
                      "seed": sampling.seed, "n_samples": sampling.n_samples} if sampling else {"sampled": False}),
        "accuracy_interval": ("95% bootstrap over problems of pass@1" if sampling and sampling.n_samples > 1
                              else "Wilson score 95%"),
        "target_gain": first["target_gain"],
        "checks": first["checks"],
    }
    if len(summaries) > 1:
        results["by_benchmark"] = {s["benchmark"]: s for s in summaries}
    return results


def evaluate_pair(pair, evalset: EvalSet, batch_size: int = 64, progress: bool = True) -> tuple[dict, dict]:
    """Notebook 00 for a hub pair: base, target and hybrid on ``evalset``, in the 00_pair.json layout.

    Loading the hybrid splices the base's MLPs into the target, which checks the pair is compatible (same
    architecture, layers and MLP shapes); the two tokenizers must also share their vocabulary."""
    base_tokenizer, target_tokenizer = load_tokenizer(pair.base), load_tokenizer(pair.target)
    if base_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise IncompatiblePairError(f"{pair.base} and {pair.target} have different tokenizer vocabularies "
                                    f"({len(base_tokenizer)} vs {len(target_tokenizer)} tokens); adapters need a "
                                    "fine-tune and the model it was fine-tuned from")
    (run,) = run_benchmarks(pair, ["base", "target", "hybrid"], [evalset], batch_size=batch_size,
                            progress=progress)
    models, generations = run.models, run.generations
    return {**models, "benchmark": evalset.benchmark, "source": evalset.source, "n_problems": len(evalset.items),
            "max_new_tokens": evalset.max_new_tokens, "hesitation_token": pair.hesitation_word,
            "base_model": pair.portable(pair.base), "target_model": pair.portable(pair.target)}, generations


def pair_checks(results: dict, pair) -> dict[str, bool]:
    """What notebook 00 asks of ``pair``. The organism has pair-level design checks (its kind's
    ``design_checks``, docs/method.md); a real pair is only asked to show the difference the adapters are meant to
    explain (the target is better, longer and hesitates more)."""
    if pair.kind.has_ground_truth:
        return pair.kind.hooks().design_checks(results)
    base, target = results["base"], results["target"]
    return {
        "target is more accurate than base": target["accuracy"] > base["accuracy"],
        "target responses are longer than base's": target["mean_response_tokens"] > base["mean_response_tokens"],
        "target says wait more often than base": target["wait_rate"] > base["wait_rate"],
    }


def benchmark_checks(models: dict[str, dict], train_results: dict) -> dict:
    """The paper's benchmark claims as checks on the organism, with the numbers behind each verdict.

    * the middle-sparsity adapter's mean response length is within 25% of the target's;
    * the lowest-penalty adapter recovers >= 50% of the accuracy gain;
    * the hybrid recovers far less (here: less than half of what the lowest-penalty adapter recovers).
    """
    middle, lowest = train_results.get("analysis_model"), train_results.get("lowest_penalty_model")
    checks: dict = {"analysis_model": middle, "lowest_penalty_model": lowest}
    target_length = models["target"]["mean_response_tokens"]
    if middle in models:
        ratio = models[middle]["mean_response_tokens"] / target_length if target_length else None
        checks["length_ratio_middle"] = ratio
        checks["length_within_25pct_at_middle"] = ratio is not None and abs(ratio - 1) <= 0.25
    if lowest in models:
        gain = models[lowest]["recovered_gain"]
        checks["recovered_gain_lowest"] = gain
        checks["recovered_gain_reason"] = models[lowest].get("recovered_gain_reason")
        checks["recovers_half_at_lowest"] = gain is not None and gain >= 0.5
        hybrid_gain = models.get("hybrid", {}).get("recovered_gain")
        checks["recovered_gain_hybrid"] = hybrid_gain
        checks["hybrid_recovers_far_less"] = (gain is not None and hybrid_gain is not None
                                              and hybrid_gain < 0.5 * gain)
    return checks
