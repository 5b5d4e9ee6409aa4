"""Evaluate the organism pair (base, target, and the hybrid: target with the base's MLPs) on held-out problems."""
from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from ..splice import set_mlp_choice, splice
from . import task
from .build import OrganismConfig, OrganismPaths, eval_problems, get_config, load_manifest


def load_organism_models(paths: OrganismPaths):
    """(base, target, hybrid, tokenizer) as plain transformers models; the hybrid is a spliced target."""
    tokenizer = AutoTokenizer.from_pretrained(paths.target)
    base = AutoModelForCausalLM.from_pretrained(paths.base).eval()
    target = AutoModelForCausalLM.from_pretrained(paths.target).eval()
    hybrid = splice(AutoModelForCausalLM.from_pretrained(paths.target).eval(), base)
    set_mlp_choice(hybrid, "base")
    return base, target, hybrid, tokenizer


def evaluate_organism(config: str | OrganismConfig, paths: OrganismPaths, batch_size: int = 100) -> tuple[dict, dict]:
    """Results in the 00_organism.json schema, and the generations per model (for inspection)."""
    from .evaluate import evaluate

    config = get_config(config)
    problems = eval_problems(config)
    base, target, hybrid, tokenizer = load_organism_models(paths)
    results, generations = {}, {}
    for name, model in (("base", base), ("target", target), ("hybrid", hybrid)):
        results[name], generations[name] = evaluate(model, tokenizer, problems, config.max_new_tokens,
                                                    batch_size=batch_size, desc=name)
    manifest = load_manifest(paths)
    results.update({
        "n_problems": len(problems),
        "seed": config.seed,
        "hesitation_token": task.HESITATION,
        "train_seconds": manifest["train_seconds"],
        "n_params": manifest["n_params"],
        "organism_key": manifest["key"],
    })
    return results, generations
