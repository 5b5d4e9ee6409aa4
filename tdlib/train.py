"""Training transcoder adapters with the paper's objective (docs/method.md, section 2), resumable from checkpoints.

Per batch, with the target's MLPs replaced by base MLP + adapter ("adapter" choice):

    loss = lambda_kl     * KL(p_target || p_adapter)
         + lambda_bridge * [KL(p_target || p_bridge A->T at k) + KL(p_target || p_bridge T->A at k)]
         + lambda_nmse   * mean over embeddings + L layers of NMSE(h_adapter, h_target)
         + l1_weight     * sum over layers of mean over tokens of sum_f act_f * ||W_dec[:, f]||

Each KL is a mean over the positions t whose next token t+1 is real (``tdlib.metrics.next_token_mask``: the
prediction at the last real token is never trained); NMSE and the L1 term average over every real token. The
cut k is uniform on min_cut..L, drawn from a random stream of its own (``cut_for_step``). The metric functions
themselves live in ``tdlib.metrics``.

Each forward pass runs once: the target's pass (no grad) gives the KL targets, the NMSE targets and the
residual that starts the T->A bridge; the adapter pass gives the NMSE inputs and the residual that starts the
A->T bridge; each bridge runs only the layers above its cut (``residual.run_from_layer``).

Two memory knobs leave the result unchanged (``training_identity`` ignores them): ``gradient_checkpointing``
recomputes decoder layers in the backward pass, and ``kl_chunk_tokens`` stops every pass at the final hidden state
and runs the head, log-softmax and KL a chunk of tokens at a time, recomputing each chunk in the backward pass
(``chunked_kl_divergence``), so no [batch, seq, vocab] logits are ever stored.

Three kinds share the loop: ``adapter`` (the method), ``mlp_finetune`` (the skyline: the hybrid's base MLPs
trained densely with the same objective, no sparsity) and ``local_mse`` (a per-layer transcoder fitted only to
the local MLP difference target_mlp(x) - base_mlp(x) at the adapter's placement, no end-to-end loss).
"""
from __future__ import annotations

import csv
import io
import os
import random
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from . import metrics
from .adapter import AdapterSet
from .metrics import kl_divergence, masked_mean, next_token_mask, nmse, token_kl  # noqa: F401 (re-exported)
from .models import PLACEMENTS, anatomy, unwrap
from .results import atomic_write_text
from .residual import (attention_reusable, capture_features, capture_mlp_inputs, capture_residuals, final_hidden,
                       record_attention, reuse_attention, run_from_layer)
from .schedule import warmup_cosine
from .splice import enable_gradient_checkpointing, mlp_choice, mlp_difference, spliced_mlps

RUN_KINDS = ("adapter", "mlp_finetune", "local_mse")
CHECKPOINT = "checkpoint.pt"
MEMORY_FIELDS = ("kl_chunk_tokens", "gradient_checkpointing", "checkpoint_every")
"""TrainConfig fields that change memory or checkpoint frequency, not the trained weights."""
REPORT_FIELDS = ("dead_after_tokens",)
"""TrainConfig fields that change only what is reported about a run, not the trained weights."""
OBJECTIVE_VERSION = 2
"""The loss conventions runs are trained under. 2: KL terms count position t only when token t+1 is real, and bridge
cuts draw from their own random stream. A run folder written before (no ``objective_version`` in its config) reads
as 1 and is trained again rather than loaded as if it were current."""


@dataclass
class TrainConfig:
    """One training run. Defaults follow the paper's text except lambda_bridge (the released 7B config's 2.0)."""

    kind: str = "adapter"
    """adapter | mlp_finetune (dense skyline) | local_mse (per-layer transcoder, no end-to-end loss)."""
    n_features: int = 512
    """Adapter features per layer (the paper: 8192 for a 3584-wide model)."""
    l1_weight: float = 1e-3
    """Weight of the decoder-norm-weighted L1 penalty; the sparsity knob of the sweep."""
    lr: float = 8e-4
    """Peak learning rate (AdamW)."""
    warmup: float = 0.05
    """Share of steps spent in linear warm-up (then cosine decay to 10%)."""
    steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 8
    """Sequences per step."""
    lambda_kl: float = 1.0
    """Weight of the adapt-only KL(target || adapter)."""
    lambda_bridge: float = 2.0
    """Weight of each bridging KL (the paper's text: 1.0; its released 7B config: 2.0)."""
    lambda_nmse: float = 1.0
    """Weight of the hidden-state NMSE."""
    min_cut: int = 1
    """Bridge cuts k are drawn uniformly from min_cut..L (the paper's text: 1; its released code: 0). Recorded with
    the rest of the config in run.json and in notebook 01's results (``plan.train_config``)."""
    grad_clip: float = 1.0
    """Gradient norm clip."""
    seed: int = 0
    """Seeds adapter initialisation, batches and bridge cuts (the cuts from a stream of their own, ``cut_for_step``)."""
    dead_after_tokens: int = 10_000_000
    """A feature counts as dead in training (``dead_fraction_train``) when it has not fired for this many training
    tokens (the paper's window: 10M, for hub pairs; a CPU organism run sees well under a million tokens in all, so
    its plan sets a smaller window). Changes only the report, not the trained weights."""
    checkpoint_every: int = 200
    """Write a resumable checkpoint every this many steps (and at the end)."""
    kl_chunk_tokens: int | None = None
    """None: the whole sequence at once; N: head, log-softmax and KL computed N token positions at a time under
    checkpointing, so no full-sequence logits are stored (what makes 10k-token 7B steps fit)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass instead of storing its activations: ``train`` calls
    ``tdlib.splice.enable_gradient_checkpointing`` on the model (kinds adapter and mlp_finetune)."""
    placement: str | None = None
    """Where the adapters add their output in blocks with a post-MLP norm (Gemma 2 / 3): None for the architecture's
    default (``tdlib.models.default_placement``: "mlp_output" for every family), or "mlp_output" (the
    paper's: before the norm) or "residual" (after it). Elsewhere the two are the same place. Recorded with the
    adapters (``AdapterSet.meta["placement"]``); ``new_adapters`` applies it."""
    objective_version: int = OBJECTIVE_VERSION
    """The loss conventions of this run (``OBJECTIVE_VERSION``); written to run.json, not meant to be set."""

    def __post_init__(self):
        if self.kind not in RUN_KINDS:
            raise ValueError(f"TrainConfig.kind must be one of {RUN_KINDS}, got {self.kind!r}")
        for name in ("n_features", "steps", "batch_size", "checkpoint_every", "dead_after_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("l1_weight", "lambda_kl", "lambda_bridge", "lambda_nmse", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ValueError(f"TrainConfig.lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"TrainConfig.warmup must be in [0, 1), got {self.warmup}")
        if self.min_cut not in (0, 1):
            raise ValueError(f"TrainConfig.min_cut must be 0 (released code) or 1 (paper), got {self.min_cut}")
        if self.kl_chunk_tokens is not None and self.kl_chunk_tokens < 1:
            raise ValueError(f"TrainConfig.kl_chunk_tokens must be None or >= 1, got {self.kl_chunk_tokens}")
        if self.placement is not None and self.placement not in PLACEMENTS:
            raise ValueError(f"TrainConfig.placement must be None (the architecture's default) or one of "
                             f"{PLACEMENTS}, got {self.placement!r}")
        if self.objective_version != OBJECTIVE_VERSION:
            raise ValueError(f"TrainConfig.objective_version {self.objective_version} is not this tdlib's "
                             f"{OBJECTIVE_VERSION}: that run used older loss conventions; train it again (a new "
                             "run folder) instead of resuming or loading it as current")

    @property
    def replacement(self) -> str:
        """The MLP choice of the layers being trained."""
        return "base" if self.kind == "mlp_finetune" else "adapter"


class Batches(Protocol):
    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch for ``step``: deterministic in the step, so a resumed run sees the same data."""


class Objective(NamedTuple):
    loss: torch.Tensor
    kl: torch.Tensor
    bridge_kl: torch.Tensor
    nmse: torch.Tensor
    l1: torch.Tensor
    l0: torch.Tensor
    """Active features per token, per layer (zeros for kinds without features)."""
    features: dict
    """Layer -> feature activations of the adapter pass."""


# ------------------------------------------------------------------------------------------------ terms

def token_rows(tensor, mask) -> torch.Tensor:
    """[batch, seq, ...] -> [positions where ``mask`` is 1, ...]."""
    return tensor.flatten(0, 1)[mask.flatten().bool()]


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of two [rows, n] tensors -> [rows], as a batched matrix product (no [rows, n] product
    tensor is made)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).reshape(a.shape[:-1])


class TargetDistribution(NamedTuple):
    """The target's next-token distribution at the scored rows, computed once per batch (no grad) and shared by the
    adapt-only KL and both bridges' KL."""

    probs: torch.Tensor
    """[rows, vocab] float32: p_target."""
    log_probs: torch.Tensor
    """[rows, vocab] float32: log p_target."""
    mass: torch.Tensor
    """[rows]: sum_v p (1 up to rounding; kept so the gradient is exactly that of sum_v p (log p - log q))."""


def target_distribution(target_logits: torch.Tensor) -> TargetDistribution:
    """``TargetDistribution`` of [rows, vocab] target logits."""
    with torch.no_grad():
        log_probs = F.log_softmax(target_logits.float(), dim=-1)
        probs = log_probs.exp()
        return TargetDistribution(probs, log_probs, probs.sum(-1))


class _KLToTarget(torch.autograd.Function):
    """Per row, KL(p_target || softmax(logits)) = sum_v p (log p - log q), summed term by term as
    ``tdlib.metrics.token_kl`` does (the split form sum p log p - sum p log q cancels in float32 when the KL is
    small: ~7e-4 relative error at a 32k vocabulary against ~2e-5), with the target's side precomputed
    (``TargetDistribution``), one [rows, vocab] tensor (log q) kept for the backward pass, and the gradient,
    grad * (mass * q - p), written into one buffer."""

    @staticmethod
    def forward(ctx, logits, probs, log_probs, mass):
        log_q = F.log_softmax(logits, dim=-1)
        ctx.save_for_backward(log_q, probs, mass)
        return _row_dot(probs, log_probs - log_q)

    @staticmethod
    def backward(ctx, grad):
        log_q, probs, mass = ctx.saved_tensors
        return log_q.exp().mul_(mass.unsqueeze(-1)).sub_(probs).mul_(grad.unsqueeze(-1)), None, None, None


def kl_to_target(target: TargetDistribution, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p_target || softmax(logits)); ``logits`` [rows, vocab] at the same rows as ``target``
    (equal to ``kl_divergence`` over those positions)."""
    return _KLToTarget.apply(logits.float(), *target).sum() / logits.shape[0]


PLAIN_HEAD_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3_text", "gpt2", "gpt_neox")
"""Model types whose logits are the output head applied to the decoder's final hidden state and nothing else; for
these the objective runs the head only at the scored positions (other types: the model's own logits)."""


def plain_head(model):
    """The output head when the model's logits are known to be exactly ``head(final hidden state)``, else None."""
    if unwrap(model).config.model_type not in PLAIN_HEAD_TYPES:
        return None
    try:
        return chunkable_head(model)
    except ValueError:
        return None


def chunk_kl(head, target_hidden, hidden) -> torch.Tensor:
    """Per-position KL of one chunk of final hidden states, through the head (the target's side without grad)."""
    with torch.no_grad():
        target_logits = head(target_hidden)
    return token_kl(target_logits, head(hidden))


def chunked_kl_divergence(head, target_hidden, hidden, positions, chunk_tokens: int) -> torch.Tensor:
    """``kl_divergence(head(target_hidden), head(hidden), positions)``, computed only at the positions where
    ``positions`` is 1 (pass ``next_token_mask(attention_mask)``), ``chunk_tokens`` at a time; each chunk is
    checkpointed, so its logits are recomputed in the backward pass, never stored."""
    target_rows, rows = token_rows(target_hidden, positions), token_rows(hidden, positions)
    total = torch.zeros((), device=hidden.device)
    for start in range(0, rows.shape[0], chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        total = total + checkpoint(chunk_kl, head, target_rows[chunk], rows[chunk], use_reentrant=False).sum()
    return total / positions.sum()


def sparsity(model, features: dict, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder-norm-weighted L1 summed over layers, L0 per layer), each a mean over every real token (``mask`` is
    the attention mask; L0 as ``tdlib.metrics.l0``)."""
    mlps = spliced_mlps(model)
    l0 = torch.zeros(len(mlps), device=mask.device)
    l1 = torch.zeros((), device=mask.device)
    for layer, acts in features.items():
        norms = mlps[layer].adapter.decoder_norms()
        l1 = l1 + masked_mean(acts @ norms.to(acts.dtype), mask)
        l0[layer] = metrics.l0(acts.detach(), mask)
    return l1, l0.cpu()  # one device-to-host copy per step, not one per layer


def bridge_choices(replacement: str, n_layers: int, cut: int) -> dict[str, list[str]]:
    """Per-layer MLP choices of the two bridges at ``cut``; a direction with no replaced layer is left out."""
    bridges = {}
    if cut > 0:
        bridges["replaced_to_target"] = [replacement if i < cut else "target" for i in range(n_layers)]
    if cut < n_layers:
        bridges["target_to_replaced"] = ["target" if i < cut else replacement for i in range(n_layers)]
    return bridges


def chunkable_head(model):
    """The output head, when logits are exactly ``head(final hidden state)`` (what chunking recomputes)."""
    config = unwrap(model).config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(unwrap(model)).__name__} transforms its logits ({name}={getattr(config, name)}); "
                             "kl_chunk_tokens assumes logits = head(hidden state): set kl_chunk_tokens=None")
    return unwrap(model).get_output_embeddings()


def objective(model, batch, config: TrainConfig, cut: int) -> Objective:
    """The full objective with each forward pass computed once (passes end at the final hidden state and the KL
    terms run the head chunk by chunk when ``config.kl_chunk_tokens`` is set).

    KL terms count position t only when token t+1 is real (``next_token_mask``): the prediction made at the last
    real token is never trained. NMSE and the sparsity terms count every real token.

    Work done once, not per term: the target's distribution at the scored positions (``target_distribution``) is
    shared by the three KL terms; for a model whose logits are the head of the final hidden state
    (``plain_head``) the head runs only at the scored positions; a bridge that is the replaced model itself (cut L
    for adapter->target, cut 0 for target->adapter) reuses the adapt-only KL instead of running again; and where a
    block receives the same input as a block of an earlier pass (layer 0 of the adapter pass, layer k of each
    bridge) it takes that block's attention output instead of computing it again
    (``tdlib.residual.reuse_attention``; off under active dropout, ``attention_reusable``)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    scored = next_token_mask(mask)
    n_layers = anatomy(model).n_layers
    chunked = config.kl_chunk_tokens is not None
    head = chunkable_head(model) if chunked else plain_head(model)
    hidden = head is not None  # passes stop at the final hidden state

    def run():
        if hidden:
            return final_hidden(model, ids, mask)
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def scored_logits(out):
        out = token_rows(out, scored)
        return head(out) if hidden else out

    def divergence(out):
        if chunked:
            return chunked_kl_divergence(head, target_out, out, scored, config.kl_chunk_tokens)
        return kl_to_target(target, scored_logits(out))

    bridges = bridge_choices(config.replacement, n_layers, cut)
    own = {name for name, choice in bridges.items() if all(chosen == config.replacement for chosen in choice)}
    # Blocks that receive exactly what a block of an earlier pass received take that block's attention output:
    # layer 0 of the replaced pass and layer k of the target->replaced bridge the target pass's (no grad flows there
    # either way), layer k of the replaced->target bridge the replaced pass's (its gradient joins there).
    reuse = attention_reusable(model)
    running = bridges.keys() - own
    from_target = ([0] + [cut] * ("target_to_replaced" in running)) if reuse else []
    from_replaced = [cut] if reuse and "replaced_to_target" in running else []
    with torch.no_grad(), mlp_choice(model, "target"), capture_residuals(model) as target_residuals, \
            record_attention(model, from_target) as target_attention:
        target_out = run()
        target = None if chunked else target_distribution(scored_logits(target_out))
    with mlp_choice(model, config.replacement), capture_residuals(model) as residuals, \
            capture_features(model) as features, record_attention(model, from_replaced) as attention, \
            reuse_attention(model, {0: target_attention[0]} if reuse else {}):
        out = run()
    kl = divergence(out)
    bridge_kl = torch.zeros((), device=ids.device)
    for name, choice in bridges.items():
        if name in own:  # the replaced model itself (cut L or 0): the same logits
            bridge_kl = bridge_kl + kl
            continue
        start = residuals[cut] if name == "replaced_to_target" else target_residuals[cut]
        recorded = attention if name == "replaced_to_target" else target_attention
        with mlp_choice(model, choice), reuse_attention(model, {cut: recorded[cut]} if reuse else {}):
            bridge_kl = bridge_kl + divergence(run_from_layer(model, start, cut, ids, mask, hidden))
    hidden_nmse = nmse(residuals, target_residuals, mask)
    l1, l0 = sparsity(model, features, mask)
    weight_l1 = config.l1_weight if config.kind == "adapter" else 0.0
    loss = (config.lambda_kl * kl + config.lambda_bridge * bridge_kl + config.lambda_nmse * hidden_nmse
            + weight_l1 * l1)
    return Objective(loss, kl, bridge_kl, hidden_nmse, l1, l0, features)


def naive_objective(model, batch, config: TrainConfig, cut: int) -> torch.Tensor:
    """The same loss from one full forward pass per term (the reference the efficient version must match), with the
    same token sets: KL terms over ``next_token_mask``, NMSE and sparsity over every real token."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    scored = next_token_mask(mask)
    n_layers = anatomy(model).n_layers

    def run(choice):
        with mlp_choice(model, choice), capture_residuals(model) as residuals, capture_features(model) as feats:
            logits = model(input_ids=ids, attention_mask=mask).logits
        return logits, residuals, feats

    with torch.no_grad():
        target_logits, target_residuals, _ = run("target")
    logits, residuals, features = run(config.replacement)
    loss = config.lambda_kl * kl_divergence(target_logits, logits, scored)
    for choice in bridge_choices(config.replacement, n_layers, cut).values():
        loss = loss + config.lambda_bridge * kl_divergence(target_logits, run(choice)[0], scored)
    loss = loss + config.lambda_nmse * nmse(residuals, target_residuals, mask)
    if config.kind == "adapter":
        loss = loss + config.l1_weight * sparsity(model, features, mask)[0]
    return loss


def target_mlp_inputs(model, batch) -> dict[int, torch.Tensor]:
    """Layer -> the MLP input [batch, seq, d_model] of the target itself (every MLP choice "target"), no grad."""
    with torch.no_grad(), mlp_choice(model, "target"), capture_mlp_inputs(model) as inputs:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return inputs


def local_mse_objective(model, batch, config: TrainConfig) -> Objective:
    """The local-MSE transcoder's loss, a transcoder in the usual sense: each layer's adapter reads the target's
    own MLP input x and predicts d(x), the MLP difference at the adapter's placement (``mlp_difference``:
    target_mlp(x) - base_mlp(x), both through the block's post-MLP norm under "residual"), no end-to-end term.

        loss = sum over layers of mean over real tokens of ||adapter(x) - d(x)||^2   (summed over d_model, not
               normalised: every layer's error counts in the residual stream's own units)
             + l1_weight * the decoder-norm-weighted L1 (``sparsity``, the same penalty as the adapters')

    Positions: every real token (the attention mask). The log's ``nmse`` column holds the mean over layers of
    sum ||adapter(x) - d(x)||^2 / sum ||d(x)||^2 (a readable scale), not the loss term."""
    mask = batch["attention_mask"]
    inputs = target_mlp_inputs(model, batch)
    weights = mask.unsqueeze(-1).float()
    tokens = mask.sum()
    mse = torch.zeros(())
    normalised = []
    features = {}
    for i, mlp in enumerate(spliced_mlps(model)):
        x = inputs[i]
        with torch.no_grad():
            difference = mlp_difference(mlp, x)
        out, acts = mlp.adapter(x)
        features[i] = acts
        squared_error = (((out - difference) ** 2) * weights).sum()
        mse = mse + squared_error / tokens
        normalised.append(squared_error.detach() / ((difference ** 2) * weights).sum().clamp_min(1e-12))
    l1, l0 = sparsity(model, features, mask)
    zero = torch.zeros(())
    return Objective(mse + config.l1_weight * l1, zero, zero, torch.stack(normalised).mean(), l1, l0, features)


@torch.no_grad()
def init_local_mse_decoder(model, batch) -> None:
    """Set each layer's ``b_dec`` to the mean MLP difference at the adapter's placement (``mlp_difference``) over
    the real tokens of ``batch`` (the first training batch: deterministic), the usual transcoder start: a
    feature-free adapter then already predicts the average difference, and features learn what varies around it."""
    mask = batch["attention_mask"].bool()
    inputs = target_mlp_inputs(model, batch)
    for i, mlp in enumerate(spliced_mlps(model)):
        x = inputs[i][mask]
        mlp.adapter.b_dec.copy_(mlp_difference(mlp, x).mean(0).to(mlp.adapter.b_dec.dtype))


# ------------------------------------------------------------------------------------------------- loop

def trainable_parameters(model, config: TrainConfig) -> list[torch.nn.Parameter]:
    mlps = spliced_mlps(model)
    if config.kind == "mlp_finetune":
        return [p for mlp in mlps for p in mlp.base_mlp.parameters()]
    if any(mlp.adapter is None for mlp in mlps):
        raise ValueError(f"kind={config.kind!r} trains adapters but some layers have none; attach_adapters first")
    return [p for mlp in mlps for p in mlp.adapter.parameters()]


def cut_for_step(config: TrainConfig, n_layers: int, step: int) -> int:
    """The bridge cut k of ``step``, uniform on min_cut..n_layers. Its own random stream, seeded by a string no data
    source uses, so the cut never correlates with the batch (the data streams seed ``random.Random`` with integers
    built from the same seed and step)."""
    return random.Random(f"bridge-cut/{config.seed}/{step}").randint(config.min_cut, n_layers)


def _atomic_torch_save(obj, path: Path) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


class TrainResult(NamedTuple):
    log: list[dict]
    """One row per step: losses, mean L0, learning rate."""
    tokens_since_fired: dict[int, torch.Tensor]
    """Per layer and feature: training tokens since the feature last fired (``tdlib.metrics.dead_fraction_train``)."""


def train(model, data: Batches, config: TrainConfig, run_dir: str | Path, progress: bool = True,
          after_backward=None, wandb_project: str | None = None) -> TrainResult:
    """Train ``model``'s adapters (or base MLPs) in place; resumes from ``run_dir/checkpoint.pt`` if present.

    ``wandb_project``: also log each step to Weights & Biases (off by default; needs ``pip install wandb``).
    ``after_backward(step, parameters)``, if given, runs after each step's backward pass and before gradient
    clipping (``tdlib.distributed`` uses it to average gradients across data-parallel ranks).

    A resumed run ends with the same weights as an uninterrupted one: batches and cuts are functions of the
    step, and the checkpoint holds the optimiser and scheduler states.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    parameters = trainable_parameters(model, config)
    if config.gradient_checkpointing and config.kind != "local_mse":  # local_mse runs the model without grad
        enable_gradient_checkpointing(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.steps, config.warmup))
    n_layers = anatomy(model).n_layers
    log: list[dict] = []
    since_fired = {i: torch.zeros(config.n_features, dtype=torch.long) for i in range(n_layers)}
    start = 0
    checkpoint_path = run_dir / CHECKPOINT
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        if training_identity(state["config"]) != training_identity(config):
            raise ValueError(f"{checkpoint_path} was written by a different TrainConfig; use a new run_dir or "
                             f"delete the checkpoint. Saved: {state['config']}")
        for p, saved in zip(parameters, state["parameters"]):
            p.data.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, log, since_fired = state["step"], state["log"], state["since_fired"]
    elif config.kind == "local_mse":  # from the whole first batch, so data-parallel ranks start alike
        init_local_mse_decoder(model, getattr(data, "full_batch", data.batch)(0))

    wandb_run = _start_wandb(wandb_project, config, run_dir) if wandb_project else None
    model.train()
    bar = tqdm(range(start, config.steps), desc=f"train {config.kind} l1={config.l1_weight:g}",
               initial=start, total=config.steps, disable=not progress, leave=False)
    for step in bar:
        batch = data.batch(step)
        if config.kind == "local_mse":
            result = local_mse_objective(model, batch, config)
        else:
            result = objective(model, batch, config, cut_for_step(config, n_layers, step))
        result.loss.backward()
        if after_backward is not None:
            after_backward(step, parameters)
        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mask = batch["attention_mask"].bool()
        # what the log and the dead-feature count need, copied to the host in one transfer (one device sync)
        layers = list(result.features)
        fired = [((acts.detach() > 0) & mask.unsqueeze(-1)).flatten(0, -2).any(0) for acts in result.features.values()]
        terms = torch.stack([result.loss, result.kl, result.bridge_kl, result.nmse, result.l1]).detach().float()
        host = torch.cat([terms, mask.sum().unsqueeze(0).float(), *(f.float() for f in fired)]).cpu()
        (loss, kl, bridge_kl, hidden_nmse, l1), n_tokens = host[:5].tolist(), int(host[5])
        for layer, layer_fired in zip(layers, host[6:].split([f.numel() for f in fired])):
            since_fired[layer] = torch.where(layer_fired.bool(), 0, since_fired[layer] + n_tokens)
        tokens_seen = (log[-1].get("tokens", 0) if log else 0) + n_tokens
        log.append({"step": step + 1, "tokens": tokens_seen, "loss": loss, "kl": kl, "bridge_kl": bridge_kl,
                    "nmse": hidden_nmse, "l1": l1, "l0": result.l0.mean().item(), "lr": scheduler.get_last_lr()[0],
                    **{f"l0_layer{i}": v for i, v in enumerate(result.l0.tolist())}})
        if wandb_run is not None:
            wandb_run.log(log[-1], step=step + 1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{log[-1]['loss']:.3f}", l0=f"{log[-1]['l0']:.1f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            _atomic_torch_save({"config": asdict(config), "step": step + 1, "log": log, "since_fired": since_fired,
                                "parameters": [p.detach().clone() for p in parameters],
                                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                               checkpoint_path)
    model.eval()
    if wandb_run is not None:
        wandb_run.finish()
    _write_log(log, run_dir / "log.csv")
    return TrainResult(log, since_fired)


def _start_wandb(project: str, config: TrainConfig, run_dir: Path):
    try:
        import wandb
    except ImportError:
        raise ImportError("wandb_project is set but wandb is not installed: pip install wandb, or leave "
                          "wandb_project=None (the CSV log in the run folder has the same numbers)") from None
    return wandb.init(project=project, name=run_dir.name, config=asdict(config), dir=str(run_dir), resume="allow")


def _write_log(log: list[dict], path: Path) -> None:
    if not log:
        return
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=list(log[0]))
    writer.writeheader()
    writer.writerows(log)
    atomic_write_text(path, stream.getvalue())


def logged_train_tokens(run_dir: str | Path) -> int | None:
    """Training tokens (real tokens of every batch) a finished run saw in all: the last ``tokens`` of its
    log.csv; None for a log written before that column existed, or no log."""
    path = Path(run_dir) / "log.csv"
    if not path.exists():
        return None
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    if not rows or not rows[-1].get("tokens"):
        return None
    return int(float(rows[-1]["tokens"]))


def run_dead_features(run_dir: str | Path, info: dict) -> dict:
    """The paper's dead-feature count of a finished run (``info``: its run.json): ``dead_fraction_train`` (see
    ``tdlib.metrics.dead_fraction_train``; None for a run without features, or shorter than the window) and the
    window ``dead_after_tokens`` it used (the value recorded with the run)."""
    config = info["train_config"]
    window = config.get("dead_after_tokens", TrainConfig.dead_after_tokens)
    if config["kind"] == "mlp_finetune" or not info.get("tokens_since_fired"):
        return {"dead_fraction_train": None, "dead_after_tokens": window}
    fraction = metrics.dead_fraction_train(info["tokens_since_fired"], window, logged_train_tokens(run_dir))
    return {"dead_fraction_train": fraction, "dead_after_tokens": window}


def training_identity(config: TrainConfig | dict) -> dict:
    """What decides the trained weights: the config (or its ``asdict``) less ``MEMORY_FIELDS`` and
    ``REPORT_FIELDS``. Runs and checkpoints with equal identities are the same run, also when written before those
    fields existed; a dict without ``objective_version`` was trained under version 1 and is a different run."""
    values = asdict(config) if isinstance(config, TrainConfig) else {"objective_version": 1, **config}
    if values.get("placement") is None:  # the architecture's default, also for runs saved before the field existed
        values = {name: value for name, value in values.items() if name != "placement"}
    return {name: value for name, value in values.items() if name not in MEMORY_FIELDS + REPORT_FIELDS}


def new_adapters(model, config: TrainConfig, meta: dict | None = None):
    """Freshly initialised adapters for ``model`` as ``config`` trains them: its feature count, seed and placement
    (``meta`` is recorded with them)."""
    placement = {} if config.placement is None else {"placement": config.placement}
    return AdapterSet.for_model(model, config.n_features, seed=config.seed, meta={**(meta or {}), **placement})


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from its ``asdict`` (fields missing from an older run's dict take their defaults)."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(known)}")
    return TrainConfig(**values)
