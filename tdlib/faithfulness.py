"""Output and internal faithfulness of replacement models to the target (notebook 02; the paper's Figs. 2-3).

Text is on-policy: each held-out prompt followed by the target's own greedy response (``onpolicy_batches``).
The target runs once per batch (``target_passes``); every model is then compared with those cached outputs:

* output faithfulness: KL(target || model) and top-1 disagreement with the target's argmax, mean over
  non-padding tokens, with a bootstrap 95% interval that resamples *sequences* (seeded); also on the
  "uncertain" tokens, where the target's top probability is <= 0.8 (the paper's second view);
* internal faithfulness: NMSE of every hidden state (embedding output, then each layer's output) against the
  target's, and the KL when only a subset of layers uses the adapter (``subset_kl``).

The figures of these numbers are in ``tdlib.plots``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import pad_batch
from .generate import generate_greedy

from .residual import capture_features, capture_residuals
from .splice import is_spliced, mlp_choice


@dataclass(frozen=True)
class FaithfulnessConfig:
    """How notebook 02 measures faithfulness."""

    n_rollouts: int = 200
    """Held-out prompts whose target responses form the text (the paper used 200 rollouts)."""
    max_new_tokens: int = 200
    """Generation budget of the target's responses."""
    batch_size: int = 50
    """Sequences per forward pass."""
    n_bootstrap: int = 1000
    """Bootstrap resamples (of sequences) for the 95% intervals."""
    seed: int = 0
    """Seeds the bootstrap."""
    uncertain_threshold: float = 0.8
    """A token is "uncertain" when the target's top next-token probability is <= this."""
    cache_target: bool = True
    """Keep the target's log-probabilities of every batch (fast; the organism). False: run the target again for
    each compared model (``RecomputedPasses``), what a 7B pair with 4k-token rollouts needs."""

    def __post_init__(self):
        if self.n_rollouts < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("FaithfulnessConfig needs n_rollouts, max_new_tokens and batch_size >= 1")
        if self.n_bootstrap < 10:
            raise ValueError(f"FaithfulnessConfig.n_bootstrap must be >= 10 for an interval, got {self.n_bootstrap}")
        if not 0 < self.uncertain_threshold <= 1:
            raise ValueError(f"uncertain_threshold must be in (0, 1], got {self.uncertain_threshold}")


def onpolicy_batches(target, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                     progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of prompt + the target's greedy response (+ end-of-sequence when it stopped)."""
    generation = generate_greedy(target, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, progress=progress, desc="target rollouts")
    sequences = []
    for prompt, response, length in zip(prompts, generation.responses, generation.response_tokens):
        ids = tokenizer(prompt + response)["input_ids"]
        sequences.append(ids + [tokenizer.eos_token_id] if length < max_new_tokens else ids)
    return [pad_batch(tokenizer, sequences[i:i + batch_size]) for i in range(0, len(sequences), batch_size)]


@dataclass
class TargetPass:
    """The target's outputs on one batch, cached so every model is compared without running the target again."""

    log_probs: torch.Tensor
    residuals: list[torch.Tensor]
    mask: torch.Tensor
    """1 on real tokens."""
    uncertain: torch.Tensor
    """1 on real tokens where the target's top probability is <= the threshold."""


def _forward(model, batch):
    with capture_residuals(model) as residuals, capture_features(model) as features:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits, list(residuals), dict(features)


@torch.no_grad()
def target_pass(target, batch: dict, uncertain_threshold: float = 0.8) -> TargetPass:
    """The target's outputs on one batch (``target``: a plain model, or a spliced one switched to "target")."""
    if is_spliced(target):
        with mlp_choice(target, "target"):
            logits, residuals, _ = _forward(target, batch)
    else:
        logits, residuals, _ = _forward(target, batch)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    mask = batch["attention_mask"].bool()
    uncertain = mask & (log_probs.max(-1).values.exp() <= uncertain_threshold)
    return TargetPass(log_probs, residuals, mask, uncertain)


class RecomputedPasses:
    """The target passes of ``batches`` without keeping them: each iteration runs the target again, one batch at
    a time. For real pairs, where cached log-probabilities do not fit anywhere (200 rollouts x 4k tokens x a 152k
    vocabulary in float32 is ~500 GB); costs one extra target forward per batch and compared model."""

    def __init__(self, target, batches: list[dict], uncertain_threshold: float = 0.8):
        self.target, self.batches, self.uncertain_threshold = target, batches, uncertain_threshold

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield target_pass(self.target, batch, self.uncertain_threshold)


def target_passes(target, batches: list[dict], uncertain_threshold: float = 0.8,
                  cache: bool = True) -> list[TargetPass] | RecomputedPasses:
    """Run the target once per batch and keep its outputs (``cache=False``: recompute them whenever they are
    iterated, see ``RecomputedPasses``)."""
    if not cache:
        return RecomputedPasses(target, batches, uncertain_threshold)
    return [target_pass(target, batch, uncertain_threshold) for batch in batches]


@dataclass
class Comparison:
    """Per-sequence sums of one model's disagreement with the target (for bootstrapping), plus layer totals."""

    kl: np.ndarray
    top1: np.ndarray
    tokens: np.ndarray
    kl_uncertain: np.ndarray
    top1_uncertain: np.ndarray
    tokens_uncertain: np.ndarray
    nmse_by_layer: list[float]
    l0: float | None


@torch.no_grad()
def compare(model, batches: list[dict], passes: list[TargetPass]) -> Comparison:
    """Compare ``model`` (with whatever MLP choice it has) with the cached target passes, sequence by sequence."""
    sums = {k: [] for k in ("kl", "top1", "tokens", "kl_uncertain", "top1_uncertain", "tokens_uncertain")}
    nmse_num = nmse_den = None
    active, feature_tokens, n_layers_with_features = 0.0, 0, 0
    for batch, reference in zip(batches, passes):
        logits, residuals, features = _forward(model, batch)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        per_token_kl = (reference.log_probs.exp() * (reference.log_probs - log_probs)).sum(-1)
        disagree = (reference.log_probs.argmax(-1) != log_probs.argmax(-1)).float()
        for suffix, keep in (("", reference.mask), ("_uncertain", reference.uncertain)):
            keep = keep.float()
            sums["kl" + suffix].append((per_token_kl * keep).sum(-1))
            sums["top1" + suffix].append((disagree * keep).sum(-1))
            sums["tokens" + suffix].append(keep.sum(-1))
        weights = reference.mask.unsqueeze(-1).float()
        num = torch.stack([(((a - t) ** 2) * weights).sum() for a, t in zip(residuals, reference.residuals)])
        den = torch.stack([((t ** 2) * weights).sum() for t in reference.residuals])
        nmse_num = num if nmse_num is None else nmse_num + num
        nmse_den = den if nmse_den is None else nmse_den + den
        if features:
            n_layers_with_features = len(features)
            active += sum(float((acts[reference.mask] > 0).sum()) for acts in features.values())
            feature_tokens += int(reference.mask.sum())
    arrays = {k: torch.cat(v).double().numpy() for k, v in sums.items()}
    l0 = active / (feature_tokens * n_layers_with_features) if feature_tokens else None
    return Comparison(**arrays, nmse_by_layer=(nmse_num / nmse_den).tolist(), l0=l0)


def bootstrap_ratio(numerators: np.ndarray, denominators: np.ndarray, n_bootstrap: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of sum(numerators) / sum(denominators) when whole sequences are resampled."""
    numerators, denominators = np.asarray(numerators, float), np.asarray(denominators, float)
    if denominators.sum() == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(numerators), size=(n_bootstrap, len(numerators)))
    totals = denominators[index].sum(1)
    ratios = numerators[index].sum(1) / np.where(totals > 0, totals, np.nan)
    low, high = np.nanpercentile(ratios, [2.5, 97.5])
    return (float(low), float(high))


def summarize(comparison: Comparison, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """The results-contract entry of one model: means over tokens and sequence-bootstrap intervals."""
    c = comparison

    def ratio(num, den):
        total = den.sum()
        return float(num.sum() / total) if total else float("nan")

    return {
        "l0": c.l0,
        "kl": ratio(c.kl, c.tokens),
        "kl_ci": list(bootstrap_ratio(c.kl, c.tokens, n_bootstrap, seed)),
        "top1_error": ratio(c.top1, c.tokens),
        "top1_error_ci": list(bootstrap_ratio(c.top1, c.tokens, n_bootstrap, seed)),
        "nmse_by_layer": c.nmse_by_layer,
        "kl_uncertain": ratio(c.kl_uncertain, c.tokens_uncertain),
        "kl_uncertain_ci": list(bootstrap_ratio(c.kl_uncertain, c.tokens_uncertain, n_bootstrap, seed)),
        "top1_error_uncertain": ratio(c.top1_uncertain, c.tokens_uncertain),
        "top1_error_uncertain_ci": list(bootstrap_ratio(c.top1_uncertain, c.tokens_uncertain, n_bootstrap, seed)),
        "n_tokens": int(c.tokens.sum()),
        "n_uncertain_tokens": int(c.tokens_uncertain.sum()),
        "n_sequences": len(c.tokens),
    }


def layer_subsets(n_layers: int, max_blocks_layers: int = 8) -> dict[str, list[int]]:
    """Named subsets of layers that use the adapter: each single layer, contiguous blocks (every block when the
    model has <= ``max_blocks_layers`` layers, else the first k and last k), the two halves, and all layers.
    Subsets with the same layers keep their first name."""
    candidates: list[tuple[str, list[int]]] = [(f"layer {i}", [i]) for i in range(n_layers)]
    half = n_layers // 2
    candidates += [("first half", list(range(half))), ("second half", list(range(half, n_layers)))]
    if n_layers <= max_blocks_layers:
        blocks = [(i, j) for length in range(2, n_layers) for i in range(n_layers - length + 1)
                  for j in [i + length]]
    else:
        blocks = [(0, k) for k in range(2, n_layers)] + [(n_layers - k, n_layers) for k in range(2, n_layers)]
    candidates += [(f"layers {i}-{j - 1}", list(range(i, j))) for i, j in blocks]
    candidates.append(("all", list(range(n_layers))))
    subsets, seen = {}, set()
    for name, layers in candidates:
        if layers and tuple(layers) not in seen:
            seen.add(tuple(layers))
            subsets[name] = layers
    return subsets


@torch.no_grad()
def subset_kl(model, batches: list[dict], passes: list[TargetPass], subsets: dict[str, list[int]],
              progress: bool = True) -> dict[str, float]:
    """KL(target || model) when only the layers of each subset use their adapter (the rest the target's MLP)."""
    results = {}
    for name, layers in tqdm(subsets.items(), desc="layer subsets", disable=not progress, leave=False):
        with mlp_choice(model, {layer: "adapter" for layer in layers}):
            comparison = compare(model, batches, passes)
        results[name] = float(comparison.kl.sum() / comparison.tokens.sum())
    return results


def subset_finding(kl_by_subset: dict[str, float]) -> dict:
    """Whether every proper subset stays below the all-layers KL (the paper's "errors don't accumulate")."""
    all_layers = kl_by_subset["all"]
    partial = {k: v for k, v in kl_by_subset.items() if k != "all"}
    worst = max(partial, key=partial.get) if partial else None
    return {
        "all_layers_kl": all_layers,
        "every_subset_below_all": all(v < all_layers for v in partial.values()),
        "worst_subset": worst,
        "worst_subset_kl": partial.get(worst),
        "subsets_at_or_above_all": sorted(k for k, v in partial.items() if v >= all_layers),
    }


def model_names(train_results: dict) -> list[str]:
    """The models notebook 02 compares: base, hybrid and every trained model listed by notebook 01."""
    names = ["base", "hybrid"]
    names += [n for n in train_results["models"] if n not in names and n != "target"]
    return names


def evaluate_faithfulness(pair, names: list[str], batches: list[dict], config: FaithfulnessConfig,
                          passes: list[TargetPass] | None = None, progress: bool = True) -> dict[str, dict]:
    """{name: summary} for each model, comparing with one cached target pass per batch (``passes``, computed here
    when not given)."""
    from .sweep import load_named

    if passes is None:
        passes = target_passes(load_named(pair, "target"), batches, config.uncertain_threshold, config.cache_target)
    results = {}
    for name in tqdm(names, desc="models", disable=not progress):
        model = load_named(pair, name)
        results[name] = summarize(compare(model, batches, passes), config.n_bootstrap, config.seed)
        del model
    return results
