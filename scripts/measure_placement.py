"""Measuring where an adapter should add its output in blocks with a post-MLP norm (Gemma 2 / 3).

``python scripts/measure_placement.py`` trains adapters on tiny Gemma 2 and Gemma 3 pairs with both placements and the
default ``TrainConfig`` and prints the KL to the target before and after, plus how strongly each layer's
post-MLP norm rescales a small change of the MLP's output (the factor an adapter placed before the norm is
multiplied by). docs/real_models.md records the numbers and the choice they support.

``python scripts/measure_placement.py --config my_pair.json`` does the same on a real pair, the comparison that
decides the default: at each of the pair's L1 weights (notebook 01's sweep; ``--l1`` and ``--steps`` override)
it trains one adapter per placement with notebook 01's settings and prints, per run, the held-out KL and L0
(notebook 01's held-out batches and metrics), the largest training KL and its step (a spike shows instability),
plus the hybrid's KL and the post-MLP norm's gain per layer. ``--placement`` trains one placement only, ``--warmup``
sets the warm-up share (the run's name records it). Runs are kept (and resumed) under the pair's
``artifacts/placement/<pair>`` folder; ``--out`` writes every row to a JSON file.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tdlib.adapter import AdapterSet  # noqa: E402
from tdlib.models import anatomy  # noqa: E402
from tdlib.splice import mlp_choice, set_mlp_choice, splice  # noqa: E402
from tdlib.train import TrainConfig, token_kl, train  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=64)


def tiny_gemma(family: str, seed: int):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    config_class, model_class = {"gemma2": (Gemma2Config, Gemma2ForCausalLM),
                                 "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[family]
    torch.manual_seed(seed)
    return model_class(config_class(**TINY)).eval()


def tiny_pair(family: str, seed: int = 0, change: float = 1.0, mlp_scales: list[float] | None = None):
    """(base, target): a random base and a target whose MLP weights moved by ``change`` of their scale (a
    fine-tune's footprint). ``mlp_scales`` multiplies each layer's MLP output (both models): at random
    initialisation MLP outputs are ~700x smaller than the post-MLP norm's output in every layer; a real Gemma
    model has a layer-dependent ratio (about 5x in the first layer, hundreds to thousands deeper)."""
    base = tiny_gemma(family, seed)
    target = tiny_gemma(family, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for model in (base, target):
            for block, factor in zip(anatomy(model).layers, mlp_scales or []):
                block.mlp.down_proj.weight.mul_(factor)
        for name, parameter in target.named_parameters():
            if ".mlp." in name:
                parameter.add_(change * parameter.std() * torch.randn(parameter.shape, generator=generator))
    return base, target


REAL_LIKE_SCALES = [140.0, 14.0, 1.4, 0.35]
"""MLP-output multipliers that turn the random initialisation's uniform ~700x post-norm gain into a real Gemma
model's profile: about 5x, 50x, 500x and 2,000x from the first layer to the last."""


class RandomTokens:
    """Batches of random token sequences (tiny random models have no language to learn)."""

    def __init__(self, batch_size: int = 8, length: int = 24, vocab: int = 96, seed: int = 0):
        self.batch_size, self.length, self.vocab, self.seed = batch_size, length, vocab, seed

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + step)
        ids = torch.randint(0, self.vocab, (self.batch_size, self.length), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def held_out_kl(model, choice: str, n_batches: int = 4) -> float:
    data = RandomTokens(seed=999)
    total = 0.0
    for step in range(n_batches):
        ids = data.batch(step)["input_ids"]
        with mlp_choice(model, "target"):
            reference = model(ids).logits
        with mlp_choice(model, choice):
            total += float(token_kl(reference, model(ids).logits).mean())
    return total / n_batches


@torch.no_grad()
def post_norm_gain(model, data: RandomTokens | torch.Tensor) -> list[float]:
    """Per layer: ||norm(m + e) - norm(m)|| / ||e|| for a small random change e of the MLP output m, averaged
    over positions (of ``data``'s first batch, or the given token ids): what an adapter placed before the post-MLP
    norm is multiplied by."""
    gains, captured = [], {}
    blocks = anatomy(model).layers
    name = anatomy(model).post_mlp_norm_name
    handles = [getattr(block, name).register_forward_hook(
        lambda module, args, output, i=i: captured.__setitem__(i, (module, args[0]))) for i, block in enumerate(blocks)]
    ids = data if isinstance(data, torch.Tensor) else data.batch(0)["input_ids"]
    with mlp_choice(model, "base"):
        model(ids.to(next(model.parameters()).device))
    for handle in handles:
        handle.remove()
    generator = torch.Generator().manual_seed(0)
    for i in range(len(blocks)):
        norm, m = captured[i]
        norm = getattr(norm, "norm", norm)
        noise = torch.randn(m.shape, generator=generator).to(m)
        e = 1e-4 * m.norm(dim=-1, keepdim=True) * noise / m.shape[-1] ** 0.5
        gains.append(float(((norm(m + e) - norm(m)).norm(dim=-1) / e.norm(dim=-1)).mean()))
    return gains


def measure(family: str, placement: str, steps: int = 60, n_features: int = 64,
            mlp_scales: list[float] | None = None, seed: int = 0) -> dict:
    base, target = tiny_pair(family, seed, mlp_scales=mlp_scales)
    adapters = AdapterSet.for_model(target, n_features, seed=seed, meta={"placement": placement})
    model = splice(target, base, adapters)
    data = RandomTokens(seed=seed)
    result = {"family": family, "placement": placement, "mlp_scales": mlp_scales,
              "hybrid_kl": held_out_kl(model, "base"), "post_norm_gain": post_norm_gain(model, data)}
    config = TrainConfig(n_features=n_features, steps=steps, checkpoint_every=steps, seed=seed)
    with tempfile.TemporaryDirectory() as run_dir:
        log = train(model, data, config, run_dir, progress=False).log
    set_mlp_choice(model, "adapter")
    result.update(adapter_kl=held_out_kl(model, "adapter"), max_train_kl=max(row["kl"] for row in log),
                  final_l0=log[-1].get("l0"), steps=steps)
    return result


def measure_pair(config: str, l1_weights=None, steps: int | None = None, root: Path | None = None,
                 progress: bool = True, placements=None, warmup: float | None = None) -> list[dict]:
    """Both placements (or ``placements``) on the pair ``config`` at each of its L1 weights (``l1_weights``/
    ``steps``/``warmup``: None for notebook 01's): one row per trained adapter, after a first row for the hybrid."""
    from dataclasses import replace

    from tdlib.faithfulness import evaluate_replacement
    from tdlib.models import PLACEMENTS, load_tokenizer
    from tdlib.pair_data import data_for
    from tdlib.pairs import resolve_pair
    from tdlib.runs import spliced_target
    from tdlib.sweep import RunSpec, notebook_plan, train_run, validation_batches

    pair = resolve_pair(config)
    plan = notebook_plan(pair, l1_weights=l1_weights, steps=steps)
    tokenizer = load_tokenizer(pair.target)
    batches = validation_batches(pair, plan, tokenizer)
    model = spliced_target(pair)
    if anatomy(model).post_mlp_norm_name is None:
        raise SystemExit(f"{pair.target} has no post-MLP norm, so both placements add at the same place; "
                         "there is nothing to compare (the question arises for Gemma 2 / 3 blocks)")
    rows = [{"pair": pair.name, "run": "hybrid", "held_out_kl": evaluate_replacement(model, batches, "base")["kl"],
             "post_norm_gain": post_norm_gain(model, batches[0]["input_ids"][:1])}]
    del model
    root = Path(root) if root else pair.artifacts("placement")
    base = plan.base if warmup is None else replace(plan.base, warmup=warmup)
    suffix = "" if warmup is None else f"_warmup_{warmup:g}"
    for l1_weight in sorted(plan.l1_weights, reverse=True):
        for placement in placements or PLACEMENTS:
            spec = RunSpec(f"{placement}_l1_{l1_weight:g}{suffix}",
                           replace(base, kind="adapter", l1_weight=l1_weight, placement=placement))
            data = data_for(pair, tokenizer, batch_size=spec.config.batch_size, seed=spec.config.seed)
            model, _ = train_run(pair, spec, data, root=root, progress=progress)
            held_out = evaluate_replacement(model, batches, "adapter")
            with open(root / spec.name / "log.csv") as stream:
                log = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(stream)]
            worst = max(log, key=lambda row: row["kl"])
            rows.append({"pair": pair.name, "run": spec.name, "placement": placement, "l1_weight": l1_weight,
                         "steps": spec.config.steps, "warmup": spec.config.warmup, "held_out_kl": held_out["kl"], "l0": held_out["l0"],
                         "first_train_kl": log[0]["kl"], "max_train_kl": worst["kl"],
                         "max_train_kl_step": int(worst["step"]), "final_train_kl": log[-1]["kl"]})
            print(json.dumps(rows[-1]), flush=True)
            del model
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None,
                        help="optimiser steps per run (default: 60 on the tiny pairs, notebook 01's on --config)")
    parser.add_argument("--config", help="a pair (name or pair file) to measure instead of the tiny pairs")
    parser.add_argument("--l1", type=float, nargs="+", help="L1 weights (default: the pair's sweep)")
    parser.add_argument("--placement", choices=("mlp_output", "residual"), nargs="+",
                        help="placements to train (default: both)")
    parser.add_argument("--warmup", type=float, help="warm-up share of the steps (default: notebook 01's)")
    parser.add_argument("--root", help="where the runs go (default: artifacts/placement/<pair>)")
    parser.add_argument("--out", help="also write every row to this JSON file")
    args = parser.parse_args(argv)
    if args.config:
        rows = measure_pair(args.config, args.l1, args.steps, args.root, placements=args.placement,
                            warmup=args.warmup)
        if args.out:
            from tdlib.results import atomic_write_text

            atomic_write_text(Path(args.out), json.dumps(rows, indent=1) + "\n")
        return
    for family in ("gemma2", "gemma3"):
        for scales in (None, REAL_LIKE_SCALES):
            for placement in ("mlp_output", "residual"):
                print(json.dumps(measure(family, placement, args.steps or 60, mlp_scales=scales)), flush=True)


if __name__ == "__main__":
    main()
