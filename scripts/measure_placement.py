"""Measuring where an adapter should add its output in blocks with a post-MLP norm (Gemma 2 / 3).

``python scripts/measure_placement.py`` trains adapters on tiny Gemma 2 and Gemma 3 pairs with both placements and the
default ``TrainConfig`` and prints the KL to the target before and after, plus how strongly each layer's
post-MLP norm rescales a small change of the MLP's output (the factor an adapter placed before the norm is
multiplied by). docs/real_models.md records the numbers and the choice they support.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tdlib.adapter import AdapterSet  # noqa: E402
from tdlib.models import find_layers, post_mlp_norm_name  # noqa: E402
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
            for block, factor in zip(find_layers(model), mlp_scales or []):
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
def post_norm_gain(model, data: RandomTokens) -> list[float]:
    """Per layer: ||norm(m + e) - norm(m)|| / ||e|| for a small random change e of the MLP output m, averaged
    over positions: what an adapter placed before the post-MLP norm is multiplied by."""
    gains, captured = [], {}
    blocks = find_layers(model)
    name = post_mlp_norm_name(model)
    handles = [getattr(block, name).register_forward_hook(
        lambda module, args, output, i=i: captured.__setitem__(i, (module, args[0]))) for i, block in enumerate(blocks)]
    with mlp_choice(model, "base"):
        model(data.batch(0)["input_ids"])
    for handle in handles:
        handle.remove()
    for i in range(len(blocks)):
        norm, m = captured[i]
        norm = getattr(norm, "norm", norm)
        e = 1e-4 * m.norm(dim=-1, keepdim=True) * torch.randn_like(m) / m.shape[-1] ** 0.5
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    for family in ("gemma2", "gemma3"):
        for scales in (None, REAL_LIKE_SCALES):
            for placement in ("mlp_output", "residual"):
                print(json.dumps(measure(family, placement, args.steps, mlp_scales=scales)), flush=True)


if __name__ == "__main__":
    main()
