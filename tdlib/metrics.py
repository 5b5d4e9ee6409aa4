"""The one place every metric of the project is defined: training, held-out evaluation and faithfulness use these.

Conventions (``docs/method.md``), stated again in each function:

* **Which positions count.** Inputs are [batch, seq, ...] tensors with a ``positions`` mask ([batch, seq], 1 where
  the position counts). KL and top-1 disagreement score the *prediction made at position t*, so they count t only
  when token t+1 is a real token: ``next_token_mask(attention_mask)``. The prediction at the last real token (after
  the end-of-sequence token, or at a truncation) is never trained and never scored. NMSE, FVU and L0 describe the
  hidden states and features *at* a token, so they count every real position (``attention_mask`` itself).
* **KL direction.** KL(p_target || p_model), summed over the vocabulary, in nats per scored position.
* **NMSE entries.** ``nmse_by_layer`` lists every hidden state: index 0 the embedding output, index i the output of
  layer i-1. The embedding is shared by base and target, so entry 0 is identically zero for every replacement
  model; ``nmse_layers`` (the headline) is the mean over the layer outputs only, ``nmse_with_embedding`` the mean
  over all entries (what the training objective weights, as the paper's code does).
* **FVU** of an adapter: sum of squared errors against the true MLP difference at the adapter's placement
  (``tdlib.splice.mlp_difference``: target_mlp(x) - base_mlp(x); under the "residual" placement of blocks with a
  post-MLP norm, norm(target_mlp(x)) - norm(base_mlp(x)), the difference of the blocks' residual writes), divided
  by that difference's total variance (about its per-dimension mean), on the given MLP inputs x.
* **L0**: active features (activation > 0) per real token per layer.
* **Dead features**, two counts under two names: ``dead_fraction_train`` (the paper's: not fired during the last
  ``dead_after_tokens`` training tokens) and ``dead_fraction_heldout`` (never fired on the held-out tokens).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F



# ------------------------------------------------------------------------------------------------ positions

def next_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The KL / top-1 token set: 1 at position t when tokens t and t+1 are both real (``attention_mask`` 1).

    [batch, seq] in, [batch, seq] out (same dtype). The last real position of each row, whose prediction has no
    real next token to be judged against, is 0; works for right and left padding alike."""
    real = attention_mask.bool()
    scored = torch.zeros_like(real)
    scored[..., :-1] = real[..., :-1] & real[..., 1:]
    return scored.to(attention_mask.dtype)


def masked_mean(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean of per-position ``values`` [batch, seq] over the positions where ``positions`` is 1."""
    weights = positions.to(values.dtype)
    return (values * weights).sum() / weights.sum()


# ------------------------------------------------------------------------------------------------------- KL

def kl_from_log_probs(target_log_probs: torch.Tensor, model_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p_target || p_model) from log-probabilities [..., vocab] -> [...]; every position, no mask."""
    return (target_log_probs.exp() * (target_log_probs - model_log_probs)).sum(-1)


def token_kl(target_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p_target || p_model) from logits [..., vocab] -> [...] (float32); every position, no mask:
    the caller chooses which count (``next_token_mask``)."""
    return kl_from_log_probs(F.log_softmax(target_logits.float(), dim=-1),
                             F.log_softmax(model_logits.float(), dim=-1))


def kl_divergence(target_logits: torch.Tensor, model_logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean KL(p_target || p_model) over the positions where ``positions`` is 1 (the project's KL token set is
    ``next_token_mask(attention_mask)``; pass that, not the attention mask)."""
    return masked_mean(token_kl(target_logits, model_logits), positions)


# ---------------------------------------------------------------------------------------------------- top-1

def token_top1_disagreement(target_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """Per position, 1.0 where the model's argmax next token differs from the target's, else 0.0 ([..., vocab] ->
    [...]); logits or log-probabilities alike (same argmax); every position, no mask."""
    return (target_logits.argmax(-1) != model_logits.argmax(-1)).float()


def top1_disagreement(target_logits: torch.Tensor, model_logits: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    """Share of positions (where ``positions`` is 1; use ``next_token_mask``) whose argmax differs from the
    target's."""
    return masked_mean(token_top1_disagreement(target_logits, model_logits), positions)


# ----------------------------------------------------------------------------------------------------- NMSE

def nmse_sums(model_residuals: Sequence[torch.Tensor], target_residuals: Sequence[torch.Tensor],
              positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per hidden-state entry (index 0 embedding output, i the output of layer i-1): (sum of squared errors, sum of
    squared target values) over the positions where ``positions`` is 1 (every real token: the attention mask).

    Sums, so that several batches can be added before dividing; differentiable in ``model_residuals``."""
    weights = positions.unsqueeze(-1).to(target_residuals[0].dtype)
    errors = torch.stack([(((a - t) ** 2) * weights).sum() for a, t in zip(model_residuals, target_residuals)])
    norms = torch.stack([((t ** 2) * weights).sum() for t in target_residuals])
    return errors, norms


def nmse_by_layer(model_residuals: Sequence[torch.Tensor], target_residuals: Sequence[torch.Tensor],
                  positions: torch.Tensor) -> torch.Tensor:
    """NMSE of every hidden-state entry, sum((h_model - h_target)^2) / sum(h_target^2) over the positions where
    ``positions`` is 1 (every real token); index 0 is the embedding output, index i the output of layer i-1."""
    errors, norms = nmse_sums(model_residuals, target_residuals, positions)
    return errors / norms


def nmse_layers(by_layer: Sequence[float] | torch.Tensor):
    """The headline NMSE: mean over the layer outputs of ``nmse_by_layer``, the embedding entry (index 0, zero
    whenever embeddings are shared) excluded."""
    values = by_layer[1:]
    return sum(values) / len(values)


def nmse_with_embedding(by_layer: Sequence[float] | torch.Tensor):
    """Mean over every entry of ``nmse_by_layer``, the embedding entry included (the training term's weighting)."""
    return sum(by_layer) / len(by_layer)


def nmse(model_residuals: Sequence[torch.Tensor], target_residuals: Sequence[torch.Tensor],
         positions: torch.Tensor) -> torch.Tensor:
    """The training objective's NMSE term: ``nmse_with_embedding`` of ``nmse_by_layer`` over the positions where
    ``positions`` is 1 (every real token), as a differentiable scalar."""
    return nmse_by_layer(model_residuals, target_residuals, positions).mean()


# ------------------------------------------------------------------------------------------------------ FVU

class RunningFVU:
    """Fraction of variance unexplained, accumulated over batches of rows (one layer's MLP inputs' positions).

    ``add(prediction, truth)`` takes [rows, d] tensors (the caller has already kept only the positions that count:
    every real token); ``value()`` = sum((prediction - truth)^2) / sum((truth - mean(truth))^2), the mean per
    dimension over all rows added."""

    def __init__(self):
        self.squared_error = 0.0
        self.truth_sum: torch.Tensor | float = 0.0
        self.truth_squares: torch.Tensor | float = 0.0
        self.rows = 0

    def add(self, prediction: torch.Tensor, truth: torch.Tensor) -> None:
        prediction, truth = prediction.double(), truth.double()
        self.squared_error += float(((prediction - truth) ** 2).sum())
        self.truth_sum = self.truth_sum + truth.sum(0)
        self.truth_squares = self.truth_squares + (truth ** 2).sum(0)
        self.rows += truth.shape[0]

    def value(self) -> float:
        if self.rows == 0:
            raise ValueError("RunningFVU.value(): no rows were added")
        variance = float((self.truth_squares - self.truth_sum ** 2 / self.rows).sum())
        return self.squared_error / variance if variance > 0 else float("nan")


def fvu(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    """FVU of ``prediction`` against ``truth`` over all rows of [rows, d] tensors (keep the counted positions
    first): sum((prediction - truth)^2) / sum((truth - mean over rows of truth)^2)."""
    running = RunningFVU()
    running.add(prediction, truth)
    return running.value()


# ------------------------------------------------------------------------------------------------------- L0

def active_per_token(acts: torch.Tensor) -> torch.Tensor:
    """Number of active features (activation > 0) at each position: [..., n_features] -> [...] (float)."""
    return (acts > 0).sum(-1).float()


def l0(acts: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One layer's L0: mean over the positions where ``positions`` is 1 (every real token: the attention mask) of
    the number of active features."""
    return masked_mean(active_per_token(acts), positions)


# -------------------------------------------------------------------------------------------- dead features

def dead_fraction_heldout(fired: Mapping[int, torch.Tensor]) -> float:
    """Share of all features (every layer pooled) that never fired on the held-out tokens; ``fired`` maps a layer
    to a bool [n_features] tensor, True where the feature was active on at least one real held-out token."""
    if not fired:
        raise ValueError("dead_fraction_heldout needs at least one layer's fired mask")
    return 1 - torch.cat([f.flatten() for f in fired.values()]).float().mean().item()


def dead_fraction_train(tokens_since_fired: Mapping, dead_after_tokens: int, train_tokens: int | None) -> float | None:
    """The paper's dead-feature share: features (every layer pooled) that did not fire during the last
    ``dead_after_tokens`` training tokens, i.e. ``tokens_since_fired >= dead_after_tokens`` at the end of training.

    ``tokens_since_fired``: layer -> per-feature counts (a tensor or list, as ``tdlib.train`` returns and run.json
    stores). None when the run saw fewer than ``dead_after_tokens`` tokens in all (``train_tokens``; None when
    unknown), since then no feature could reach the window and the share would read 0 by construction."""
    if dead_after_tokens < 1:
        raise ValueError(f"dead_after_tokens must be >= 1, got {dead_after_tokens}")
    if train_tokens is None or train_tokens < dead_after_tokens:
        return None
    counts = torch.cat([torch.as_tensor(v).flatten() for v in tokens_since_fired.values()])
    return (counts >= dead_after_tokens).float().mean().item()
