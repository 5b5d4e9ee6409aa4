"""Evaluate the organism pair (base, target, and the hybrid: target with the base's MLPs) on held-out problems."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..metrics import kl_divergence, next_token_mask
from ..models import anatomy
from ..splice import mlp_choice, set_mlp_choice, splice
from . import mechanisms, task
from ..data import pad_batch
from .build import OrganismConfig, OrganismPaths, eval_problems, get_config, load_manifest
from .evaluate import evaluate

DESIGN_BOUNDS = {
    "min_accuracy_gain": 0.30, "min_length_ratio": 3.0, "target_wait_rate": (0.15, 0.85),
    "max_base_wait_rate": 0.05, "min_base_p_wait": 0.05, "min_target_p_wait": 0.5,
    "min_suppression_accuracy_drop": 0.05,
    "max_hybrid_accuracy_gap": 0.15, "max_hybrid_wait_gap": 0.05, "max_hybrid_kl": 2.0,
    "min_hybrid_steps_share": 0.5,
}
"""The organism's pair-level design bounds (docs/method.md, "The built-in organism"): no adapter is involved."""


class DesignCheckFailed(RuntimeError):
    """The organism pair misses a design check; the message names each failing check and its number."""


def load_organism_models(paths: OrganismPaths):
    """(base, target, hybrid, tokenizer) as plain transformers models; the hybrid is a spliced target."""
    tokenizer = AutoTokenizer.from_pretrained(paths.target)
    base = AutoModelForCausalLM.from_pretrained(paths.base).eval()
    target = AutoModelForCausalLM.from_pretrained(paths.target).eval()
    hybrid = splice(AutoModelForCausalLM.from_pretrained(paths.target).eval(), base)
    set_mlp_choice(hybrid, "base")
    return base, target, hybrid, tokenizer


def evaluate_organism(config: str | OrganismConfig, paths: OrganismPaths, batch_size: int = 100) -> tuple[dict, dict]:
    """Results in the 00_pair.json schema, and the generations per model (for inspection)."""
    config = get_config(config)
    problems = eval_problems(config)
    base, target, hybrid, tokenizer = load_organism_models(paths)
    results, generations = {}, {}
    for name, model in (("base", base), ("target", target), ("hybrid", hybrid)):
        results[name], generations[name] = evaluate(model, tokenizer, problems, config.max_new_tokens,
                                                    batch_size=batch_size, desc=name)
    results["diagnostics"] = pair_diagnostics(hybrid, base, tokenizer, problems)
    # Where a hybrid can depart from the base: working step by step on plain Q prompts
    results["diagnostics"]["plain_prompt_steps_share"] = {m: results[m]["by_style"]["direct"]["steps_share"]
                                                          for m in ("base", "target", "hybrid")}
    results["diagnostics"]["hybrid_accuracy_gap_all_prompts"] = results["hybrid"]["accuracy"] - results["base"]["accuracy"]
    results["p_hesitation"] = {name: hesitation_probability(model, tokenizer, problems)
                               for name, model in (("base", base), ("target", target), ("hybrid", hybrid))}
    wait_id = tokenizer(" " + task.HESITATION, add_special_tokens=False)["input_ids"]
    results["target_without_hesitation"], generations["target_without_hesitation"] = evaluate(
        target, tokenizer, problems, config.max_new_tokens, batch_size=batch_size, desc="target, no wait",
        banned_tokens=wait_id)
    manifest = load_manifest(paths)
    results.update({
        "n_problems": len(problems),
        "seed": config.seed,
        "hesitation_token": task.HESITATION,
        "train_seconds": manifest["train_seconds"],
        "train_tokens": manifest["tokens"],
        "fine_tune_share": manifest["tokens"]["target"] / manifest["tokens"]["base"],
        "n_params": manifest["n_params"],
        "organism_key": manifest["key"],
    })
    return results, generations


@torch.no_grad()
def pair_diagnostics(hybrid, base, tokenizer, problems: list[task.Problem], batch_size: int = 100) -> dict:
    """How far the fine-tune moved the model, without any adapter, on the target's reference traces of ``problems``:

    * ``hybrid_kl``: KL(target || hybrid) in nats per scored position (positions whose next token is real);
    * ``single_swap_kl``: the same KL when only layer i uses the base's MLP (one entry per layer);
    * ``embedding_nmse``: sum((E_base - E_target)^2) / sum(E_target^2) of the (tied) embedding matrices.
    """
    n_layers = anatomy(hybrid).n_layers
    choices = {"hybrid": "base", **{f"layer{i}": ["base" if j == i else "target" for j in range(n_layers)]
                                    for i in range(n_layers)}}
    totals = {name: 0.0 for name in choices}
    positions = 0
    for start in range(0, len(problems), batch_size):
        sequences = [tokenizer(p.prompt + task.reasoning_trace(p))["input_ids"] + [tokenizer.eos_token_id]
                     for p in problems[start:start + batch_size]]
        batch = pad_batch(tokenizer, sequences)
        scored = next_token_mask(batch["attention_mask"])
        with mlp_choice(hybrid, "target"):
            target_logits = hybrid(**batch).logits
        for name, choice in choices.items():
            with mlp_choice(hybrid, choice):
                totals[name] += kl_divergence(target_logits, hybrid(**batch).logits, scored).item() * scored.sum().item()
        positions += scored.sum().item()
    base_embedding = base.get_input_embeddings().weight
    target_embedding = hybrid.get_input_embeddings().weight
    return {
        "hybrid_kl": totals["hybrid"] / positions,
        "single_swap_kl": [totals[f"layer{i}"] / positions for i in range(n_layers)],
        "embedding_nmse": (((base_embedding - target_embedding) ** 2).sum() / (target_embedding ** 2).sum()).item(),
        "n_kl_positions": int(positions),
    }


@torch.no_grad()
def hesitation_probability(model, tokenizer, problems: list[task.Problem], batch_size: int = 100) -> dict:
    """Teacher-forced on the target's reference traces: the mean probability ``model`` puts on the hesitation word
    at each mechanism's decision points (where the trace hesitates), and at the points with no trigger."""
    wait_id = tokenizer(" " + task.HESITATION, add_special_tokens=False)["input_ids"][0]
    sums = {m: [0.0, 0] for m in (*mechanisms.MECHANISMS, "none")}
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        encoded = [mechanisms.token_decisions(tokenizer, p.prompt + task.reasoning_trace(p), len(p.prompt))
                   for p in chunk]
        batch = pad_batch(tokenizer, [ids for ids, _ in encoded])
        probs = torch.softmax(model(**batch).logits.float(), -1)[..., wait_id]
        for row, (_, placed) in enumerate(encoded):
            for index, decision in placed:
                if decision.mechanism == mechanisms.DISTRACTOR:
                    continue
                entry = sums[decision.mechanism or "none"]
                entry[0] += float(probs[row, index])
                entry[1] += 1
    out = {m: (total / n if n else None) for m, (total, n) in sums.items()}
    fired = [sums[m] for m in mechanisms.MECHANISMS]
    n = sum(c for _, c in fired)
    out["all_mechanisms"] = sum(t for t, _ in fired) / n if n else None
    out["n_points"] = {m: c for m, (_, c) in sums.items()}
    return out


def design_checks(results: dict, bounds: dict = DESIGN_BOUNDS) -> dict[str, bool]:
    """The organism's pair-level design checks on notebook 00's results (each name states its bound)."""
    base, target, hybrid = results["base"], results["target"], results["hybrid"]
    low, high = bounds["target_wait_rate"]
    p_wait = results["p_hesitation"]
    silenced = results["target_without_hesitation"]
    return {
        f"target accuracy >= base + {bounds['min_accuracy_gain']:.2f}":
            target["accuracy"] - base["accuracy"] >= bounds["min_accuracy_gain"],
        f"target length >= {bounds['min_length_ratio']:g}x base length":
            target["mean_response_tokens"] >= bounds["min_length_ratio"] * base["mean_response_tokens"],
        f"target wait rate in [{low:.2f}, {high:.2f}]": low <= target["wait_rate"] <= high,
        f"base wait rate <= {bounds['max_base_wait_rate']:.2f}": base["wait_rate"] <= bounds["max_base_wait_rate"],
        f"base knows the word: P(wait) >= {bounds['min_base_p_wait']:.2f} where the target hesitates":
            p_wait["base"]["all_mechanisms"] >= bounds["min_base_p_wait"],
        f"target decides: P(wait) >= {bounds['min_target_p_wait']:.2f} where it hesitates":
            p_wait["target"]["all_mechanisms"] >= bounds["min_target_p_wait"],
        f"hesitation matters: target accuracy without 'wait' >= {bounds['min_suppression_accuracy_drop']:.2f} lower":
            target["accuracy"] - silenced["accuracy"] >= bounds["min_suppression_accuracy_drop"],
        f"hybrid accuracy within {bounds['max_hybrid_accuracy_gap']:.2f} of base":
            abs(hybrid["accuracy"] - base["accuracy"]) <= bounds["max_hybrid_accuracy_gap"],
        f"hybrid accuracy within {bounds['max_hybrid_accuracy_gap']:.2f} of base on the prompts asking for steps":
            abs(hybrid["by_style"]["steps"]["accuracy"] - base["by_style"]["steps"]["accuracy"])
            <= bounds["max_hybrid_accuracy_gap"],
        f"hybrid wait rate within {bounds['max_hybrid_wait_gap']:.2f} of base":
            abs(hybrid["wait_rate"] - base["wait_rate"]) <= bounds["max_hybrid_wait_gap"],
        f"hybrid writes steps on >= {bounds['min_hybrid_steps_share']:.0%} of the prompts asking for them":
            hybrid["by_style"]["steps"]["steps_share"] >= bounds["min_hybrid_steps_share"],
        f"hybrid KL to target <= {bounds['max_hybrid_kl']:g} nats/token":
            results["diagnostics"]["hybrid_kl"] <= bounds["max_hybrid_kl"],
    }


def require_design(checks: dict[str, bool], results: dict) -> None:
    """Raise ``DesignCheckFailed`` naming every failing check, with the pair's numbers."""
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        numbers = {m: {k: round(results[m][k], 3) for k in ("accuracy", "mean_response_tokens", "wait_rate")}
                   for m in ("base", "target", "hybrid")}
        raise DesignCheckFailed(f"the organism pair fails its design checks {failed}; measured {numbers}, hybrid KL "
                                f"{results['diagnostics']['hybrid_kl']:.3f}. Change the OrganismConfig (pre-training "
                                "length, fine-tune lr/steps) and rebuild; see docs/method.md")
