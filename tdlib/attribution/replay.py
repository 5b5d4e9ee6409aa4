"""The frozen replay: the adapter model made linear on one prompt (see ``tdlib.attribution``).

Built from what ``capture`` records of the model's own modules, so it holds for any pre-norm decoder whose
norms scale each position (Qwen2, Llama, Gemma, Gemma 2, Gemma 3, ...): per layer

    h += attn_out_norm( attend_frozen( attn_norm(h) ) )           attn_out_norm: Gemma 2/3, else identity
    h += error + sum_f act_f * decoder_f(position)                the MLP branch's residual contribution

where every norm is frozen at its prompt scale, ``error`` is the non-feature part of the MLP branch's residual
contribution (the base MLP's output and ``b_dec``, through a frozen post-MLP norm where the block has one), and a
feature's decoder is its residual write: ``W_dec[:, f]`` for adapters placed on the residual stream, or
``W_dec[:, f]`` through the frozen post-MLP norm for adapters placed before it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..models import find_layers, get_mlp, unwrap
from .capture import FrozenNorm, NotReplayable, attention_of, capture, check_replayable, tolerance


@dataclass
class FrozenPrompt:
    """The adapter model's frozen state on one prompt (all tensors for a single sequence, no batch)."""

    input_ids: torch.Tensor
    """[P] token ids."""
    embeddings: torch.Tensor
    """[P, d] the residual stream entering layer 0 (the token nodes' values; scaled embeddings for Gemma)."""
    attn_scale: torch.Tensor
    """[L, P] each layer's attention-input norm scale (``attn_weight`` is its fixed factor, [L, d])."""
    attn_weight: torch.Tensor
    attn_out_scale: torch.Tensor
    """[L, P] the norm on the attention's output (ones where the block has none; ``attn_out_weight`` [L, d])."""
    attn_out_weight: torch.Tensor
    mlp_scale: torch.Tensor
    """[L, P] the MLP-input norm scale (the MLP and adapter input; ``mlp_weight`` [L, d])."""
    mlp_weight: torch.Tensor
    decoder_scale: torch.Tensor
    """[L, P] what the residual receives per unit of adapter output: the frozen post-MLP norm for adapters placed
    before it, ones otherwise (``decoder_weight`` [L, d])."""
    decoder_weight: torch.Tensor
    final_scale: torch.Tensor
    """[P] the final norm's scale (``final_weight`` [d])."""
    final_weight: torch.Tensor
    patterns: torch.Tensor
    """[L, H, P, P] attention patterns (rows sum to 1)."""
    errors: torch.Tensor
    """[L, P, d] error nodes' values: the MLP branch's residual contribution minus the features' writes."""
    attn_bias: torch.Tensor
    """[L, P, d] what attention adds at each position whatever its input (value and output biases)."""
    features: torch.Tensor
    """[n, 3] active features as (layer, position, feature id), sorted."""
    activations: torch.Tensor
    """[n] their activations (> 0)."""
    logits: torch.Tensor
    """[V] the unembedding's output at the last position, before any final soft-capping (the replay's logits)."""
    softcap: float | None = None
    """The model's final logit soft-capping (Gemma 2): probabilities use ``softcap * tanh(logits / softcap)``."""

    @property
    def n_layers(self) -> int:
        return self.errors.shape[0]

    @property
    def n_pos(self) -> int:
        return self.input_ids.shape[0]

    def model_logits(self) -> torch.Tensor:
        """The model's own logits (soft-capped where the model caps them)."""
        return self.logits if not self.softcap else self.softcap * torch.tanh(self.logits / self.softcap)

    def replace(self, **changes) -> "FrozenPrompt":
        return dataclasses.replace(self, **changes)


def _check_supported(model) -> None:
    check_replayable(model)


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@torch.no_grad()
def freeze(model, input_ids) -> FrozenPrompt:
    """Run the adapter model on one prompt (a list or 1-D tensor of ids) and keep what the replay freezes.
    Refuses (``NotReplayable``, naming the feature) a model the replay cannot reproduce, before running it, and
    checks that the replay reproduces every block's output and the logits."""
    check_replayable(model)
    inner = unwrap(model)
    ids = torch.as_tensor(input_ids, device=next(inner.parameters()).device).reshape(-1)
    captured = capture(inner, ids)
    tol = tolerance(captured.logits.dtype)
    h = captured.blocks[0].h_in.clone()
    embeddings, n_pos, d = h.clone(), h.shape[0], h.shape[1]
    rows: dict[str, list] = {key: [] for key in ("attn", "attn_out", "mlp", "decoder", "errors", "bias",
                                                 "features", "activations", "patterns")}
    for index, (block, frozen) in enumerate(zip(find_layers(inner), captured.blocks)):
        h = _freeze_layer(index, block, get_mlp(inner, index), frozen, h, rows, tol)
    final = captured.final
    logits = inner.get_output_embeddings()(final.apply(h))[-1]
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    state = FrozenPrompt(
        ids, embeddings, *_stack(rows["attn"]), *_stack(rows["attn_out"]), *_stack(rows["mlp"]),
        *_stack(rows["decoder"]), final.scale, final.weight, torch.stack(rows["patterns"]),
        torch.stack(rows["errors"]), torch.stack(rows["bias"]), torch.cat(rows["features"]),
        torch.cat(rows["activations"]), logits, softcap)
    gap = _relative_gap(state.model_logits(), captured.logits)
    if gap > tol:
        raise NotReplayable(f"the replay's logits differ from the model's by {gap:.2g} (relative): the model "
                            "computes its logits from the final norm's output in a way the replay does not know")
    return state


def _stack(norms: list[FrozenNorm]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([n.scale for n in norms]), torch.stack([n.weight for n in norms])


def _freeze_layer(index, block, mlp, frozen, h, rows, tol):
    n_pos, d = h.shape
    identity = FrozenNorm.identity(n_pos, d, h)
    attention = attention_of(block)
    attn_out = frozen.attn_out or identity
    bias = attn_out.apply(_value_bias(attention, frozen.pattern.shape[0]).expand(n_pos, -1))
    h = h + attn_out.apply(_attend(attention, frozen.pattern, frozen.attn_in.apply(h)[None])[0]) + bias
    x = frozen.mlp_norm.apply(h)
    if _relative_gap(x, frozen.mlp_in) > tol:
        raise NotReplayable(f"layer {index}: the MLP input is not the norm of the residual after attention "
                            "(a block wiring the replay does not know, e.g. parallel attention and MLP)")
    adapter = mlp.adapter
    acts = adapter.encode(x)
    post = frozen.mlp_out or identity
    if mlp.placement == "residual":
        error, decoder = post.apply(mlp.base_mlp(x)) + adapter.b_dec, identity
    else:
        error, decoder = post.apply(mlp.base_mlp(x) + adapter.b_dec), post
    h = h + error + decoder.apply(acts @ adapter.W_dec.T)
    if _relative_gap(h, frozen.h_out) > tol:
        raise NotReplayable(f"layer {index}: the replay does not reproduce the block's output (relative gap "
                            f"{_relative_gap(h, frozen.h_out):.2g}); the block computes something it does not know")
    positions, ids_active = (acts > 0).nonzero(as_tuple=True)
    for key, value in (("attn", frozen.attn_in), ("attn_out", attn_out), ("mlp", frozen.mlp_norm),
                       ("decoder", decoder), ("errors", error), ("bias", bias), ("patterns", frozen.pattern),
                       ("features", torch.stack([torch.full_like(positions, index), positions, ids_active], 1)),
                       ("activations", acts[positions, ids_active])):
        rows[key].append(value)
    return h


def _value_bias(attention, n_heads: int) -> torch.Tensor:
    """o_proj(b_v): what the value (and output) biases add at every position (pattern rows sum to 1)."""
    head_dim = attention.o_proj.in_features // n_heads
    weight, bias = attention.v_proj.weight, attention.v_proj.bias
    if bias is None:
        bias = torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype)
    bias = bias.view(-1, head_dim).repeat_interleave(n_heads // (bias.shape[0] // head_dim), dim=0)
    return attention.o_proj(bias.reshape(-1))


def _attend(attention, pattern: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Frozen-pattern attention without the value bias: x [B, P, d] (already normed) -> [B, P, d]."""
    n_heads = pattern.shape[0]
    head_dim = attention.o_proj.in_features // n_heads
    batch, n_pos, _ = x.shape
    values = (x @ attention.v_proj.weight.T).view(batch, n_pos, -1, head_dim)
    values = values.repeat_interleave(n_heads // values.shape[2], dim=2)
    mixed = torch.einsum("hpq,bqhd->bphd", pattern[:, :n_pos, :n_pos], values)
    return mixed.reshape(batch, n_pos, n_heads * head_dim) @ attention.o_proj.weight.T


class Replay:
    """The frozen (linear) replacement model of one prompt: run it from any node values."""

    def __init__(self, model, state: FrozenPrompt, target_token: int, demean: bool = True):
        inner = unwrap(model)
        self.state = state
        self.attentions = [attention_of(block) for block in find_layers(inner)]
        self.adapters = [get_mlp(inner, i).adapter for i in range(len(self.attentions))]
        unembed = inner.get_output_embeddings().weight
        direction = unembed[target_token] - (unembed.mean(0) if demean else 0)
        self.logit_direction = (direction * state.final_weight).detach()
        self.target_token = int(target_token)
        self.demean = demean
        self.encoders = torch.stack([a.W_enc * weight for a, weight in zip(self.adapters, state.mlp_weight)])

    def run(self, embeddings, errors, activations, biases, n_layers=None, n_pos=None, recompute=False):
        """Residual stream of the replay. Shapes carry a batch dimension B: embeddings [B, P, d];
        errors[l] [B, P, d]; activations[l] [B, n_l] (values of layer l's active features, in the order of
        ``state.features``); biases[l] [B, P, d]. ``recompute``: active features take their pre-activation
        (linear on the active set) instead of the given values. Returns (mids, final): mids[l] [B, P, d] is the
        residual before layer l's MLP."""
        state = self.state
        n_layers = state.n_layers if n_layers is None else n_layers
        n_pos = state.n_pos if n_pos is None else n_pos
        h = embeddings
        mids, values = [], []
        for index in range(n_layers):
            x = h * (state.attn_scale[index, :n_pos, None] * state.attn_weight[index])
            out = _attend(self.attentions[index], state.patterns[index], x)
            h = h + out * (state.attn_out_scale[index, :n_pos, None] * state.attn_out_weight[index]) + biases[index]
            mids.append(h)
            if index == len(errors):
                break
            positions, ids = self.layer_features(index, n_pos)
            acts = activations[index]
            if recompute:
                acts = self.preactivations(index, h, positions, ids, with_bias=True)
            values.append(acts)
            writes = torch.zeros_like(h)
            writes = writes.index_add(1, positions, acts[..., None] * self.decoder(index, positions, ids))
            h = h + errors[index] + writes
        return mids, h

    def layer_features(self, layer: int, n_pos: int | None = None):
        features = self.state.features
        keep = features[:, 0] == layer
        if n_pos is not None:
            keep &= features[:, 1] < n_pos
        return features[keep, 1], features[keep, 2]

    def decoder(self, layer: int, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[n, d] the residual write per unit activation of features ``ids`` at ``positions`` of ``layer``."""
        state = self.state
        frame = state.decoder_scale[layer, positions, None] * state.decoder_weight[layer]
        return self.adapters[layer].W_dec.T[ids] * frame

    def preactivations(self, layer, mid, positions, ids, with_bias=False):
        """Pre-activations of the given features from the residual ``mid`` [B, P, d] -> [B, n]."""
        encoder = self.encoders[layer, ids]  # [n, d]
        x = mid[:, positions] * self.state.mlp_scale[layer, positions, None]
        pre = (x * encoder).sum(-1)
        return pre + self.adapters[layer].b_enc[ids] if with_bias else pre

    def target_preactivations(self, mids, targets: torch.Tensor) -> torch.Tensor:
        """Pre-activation (without b_enc) of feature ``targets[b]`` = (layer, pos, id) read from batch copy b."""
        layers, positions, ids = targets.to(mids[0].device).unbind(1)
        stacked = torch.stack(mids)  # [L', B, P, d]
        batch = torch.arange(targets.shape[0], device=stacked.device)
        x = stacked[layers, batch, positions] * self.state.mlp_scale[layers, positions, None]
        return (x * self.encoders[layers, ids]).sum(-1)

    def logit(self, final: torch.Tensor) -> torch.Tensor:
        """The target logit (demeaned if chosen) at the last position from the final residual [B, P, d]."""
        return final[:, -1] @ self.logit_direction * self.state.final_scale[-1]

    def leaves(self, batch: int, n_layers: int, n_pos: int):
        """Per-batch copies of the node values (requiring grad) for layers < n_layers (bias up to n_layers)."""
        state = self.state

        def copy(t):
            return t.expand(batch, *t.shape).clone().requires_grad_(True)

        embeddings = copy(state.embeddings[:n_pos])
        errors = [copy(state.errors[i, :n_pos]) for i in range(n_layers)]
        activations = [copy(self.layer_activations(i, n_pos)) for i in range(n_layers)]
        biases = [copy(state.attn_bias[i, :n_pos]) for i in range(min(n_layers + 1, state.n_layers))]
        return embeddings, errors, activations, biases

    def layer_activations(self, layer: int, n_pos: int | None = None) -> torch.Tensor:
        features = self.state.features
        keep = features[:, 0] == layer
        if n_pos is not None:
            keep &= features[:, 1] < n_pos
        return self.state.activations[keep]

    def node_values(self, n_pos):
        return self.state.embeddings[:n_pos], self.state.errors[:, :n_pos]


def _attend_transposed(attention, pattern: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Transpose of ``_attend``: gradient at the attention output [B, P, d] -> at its normed input [B, P, d]."""
    n_heads = pattern.shape[0]
    head_dim = attention.o_proj.in_features // n_heads
    batch, n_pos, _ = grad.shape
    mixed = (grad @ attention.o_proj.weight).view(batch, n_pos, n_heads, head_dim)
    values = torch.einsum("hpq,bphd->bqhd", pattern[:, :n_pos, :n_pos], mixed)
    n_kv = attention.v_proj.weight.shape[0] // head_dim
    values = values.reshape(batch, n_pos, n_kv, n_heads // n_kv, head_dim).sum(3)  # heads sharing a kv head
    return values.reshape(batch, n_pos, n_kv * head_dim) @ attention.v_proj.weight


def _feature_offsets(state: FrozenPrompt) -> list[int]:
    """Index of each layer's first feature node (features are sorted by layer)."""
    counts = torch.bincount(state.features[:, 0], minlength=state.n_layers).tolist()
    return [sum(counts[:i]) for i in range(state.n_layers)]
