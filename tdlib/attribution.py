"""Attribution graphs of the adapter model, with real error nodes (DESIGN.md experiment 5).

The local replacement model
---------------------------
On one prompt, the adapter model (target with every MLP = base_mlp(x) + adapter(x)) is made linear by
freezing, at their values on the prompt:

* attention patterns (softmax outputs) of every head, and every RMSNorm denominator (1 / rms);
* the base MLP's output at each (layer, position): it is nonlinear and no feature explains it;
* each adapter feature's activation (the ReLU is cut: an edge INTO a feature is the linear effect on its
  pre-activation, which equals its activation because only active features are nodes).

Nodes (circuit-tracer order): active features ``(layer, position, feature)`` | error nodes ``(layer, position)``
| input tokens (their embedding vectors) | the target logit. The **error node** of (layer, position) is the
non-feature part of that MLP output, ``base_mlp(x) + b_dec``: everything at that MLP the features do not
account for (the adapter is the model's own MLP, so there is no further reconstruction residual).
Two constants are not nodes: attention value biases (``o_proj(b_v)``, the same vector at every position since
pattern rows sum to 1) and encoder biases ``b_enc``; they are reported as ``bias`` per row, so for every row

    sum of incoming edges + bias = the node's value        (pre-activation for features, logit for the logit)

exactly. An edge s -> t is the direct effect: d t / d value_s * value_s along paths through frozen attention
and the residual stream only (no other feature in between). Edges are computed with backward passes batched
over target nodes (``batch_size`` targets per pass, each its own copy of the leaves).

Scores (circuit-tracer's definitions, on |edges| row-normalised): ``replacement_score`` = share of the
end-to-end influence on the logit reaching the inputs through tokens rather than error nodes; ``completeness``
= influence-weighted mean share of each node's incoming |edges| that come from non-error nodes. Plus an exact
signed decomposition of the logit into tokens + error nodes + bias by total (end-to-end) effects.

The target logit is ``demeaned`` by default: logit of the token minus the mean logit over the vocabulary
(what the softmax sees relative to an average token); every identity holds for either choice.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .models import find_layers, unwrap
from .splice import SplicedMLP


# ----------------------------------------------------------------------------------------------------------
# Freezing the prompt


@dataclass
class FrozenPrompt:
    """The adapter model's frozen state on one prompt (all tensors for a single sequence, no batch)."""

    input_ids: torch.Tensor
    """[P] token ids."""
    embeddings: torch.Tensor
    """[P, d] token embeddings (the token nodes' values)."""
    attn_scale: torch.Tensor
    """[L, P] 1/rms at each layer's input norm."""
    mlp_scale: torch.Tensor
    """[L, P] 1/rms at each layer's post-attention norm (the MLP and adapter input)."""
    final_scale: torch.Tensor
    """[P] 1/rms at the final norm."""
    patterns: torch.Tensor
    """[L, H, P, P] attention patterns (rows sum to 1)."""
    errors: torch.Tensor
    """[L, P, d] error nodes' values: base_mlp(x) + b_dec."""
    attn_bias: torch.Tensor
    """[L, d] attention output bias o_proj(b_v) (added at every position)."""
    features: torch.Tensor
    """[n, 3] active features as (layer, position, feature id), sorted."""
    activations: torch.Tensor
    """[n] their activations (> 0)."""
    logits: torch.Tensor
    """[V] the model's logits at the last position (reference for checks)."""

    @property
    def n_layers(self) -> int:
        return self.errors.shape[0]

    @property
    def n_pos(self) -> int:
        return self.input_ids.shape[0]


def _check_supported(model) -> None:
    inner = unwrap(model)
    layers = find_layers(inner)
    for i, layer in enumerate(layers):
        if not isinstance(layer.mlp, SplicedMLP) or layer.mlp.choice != "adapter" or layer.mlp.adapter is None:
            raise ValueError(f"layer {i} does not run base MLP + adapter; attribution needs the adapter model "
                             "(load_named(pair, 'adapter_l1_...') or set_mlp_choice(model, 'adapter'))")
        attention = layer.self_attn
        if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ValueError("attribution supports Qwen2/Llama-style attention (q/k/v/o projections) only")
        if getattr(attention, "sliding_window", None):
            raise ValueError("sliding-window attention is not supported by the attribution replay")
    if getattr(inner.lm_head, "bias", None) is not None:
        raise ValueError("an unembedding with a bias is not supported")


def _rms_scale(norm, h: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(h.pow(2).mean(-1) + norm.variance_epsilon)


@torch.no_grad()
def freeze(model, input_ids) -> FrozenPrompt:
    """Run the adapter model on one prompt (a list or 1-D tensor of ids) and keep what the replay freezes."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    _check_supported(model)
    inner = unwrap(model)
    body = inner.model
    ids = torch.as_tensor(input_ids, device=next(inner.parameters()).device).reshape(-1)
    n_pos = ids.shape[0]
    h = body.embed_tokens(ids)
    embeddings = h.clone()
    cos, sin = body.rotary_emb(h[None], torch.arange(n_pos, device=ids.device)[None])
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=ids.device).tril()
    attn_scales, mlp_scales, patterns, errors, biases, features, activations = [], [], [], [], [], [], []
    for index, layer in enumerate(body.layers):
        attention = layer.self_attn
        n_heads, head_dim = attention.config.num_attention_heads, attention.head_dim
        attn_scales.append(_rms_scale(layer.input_layernorm, h))
        x = h * attn_scales[-1][:, None] * layer.input_layernorm.weight  # the norm, in the replay's precision
        q = attention.q_proj(x).view(n_pos, -1, head_dim).transpose(0, 1)[None]
        k = attention.k_proj(x).view(n_pos, -1, head_dim).transpose(0, 1)[None]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(n_heads // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2))[0] * attention.scaling
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        patterns.append(pattern)
        h = h + _attend(attention, pattern, x[None])[0] + _value_bias(attention)
        biases.append(_value_bias(attention))
        mlp_scales.append(_rms_scale(layer.post_attention_layernorm, h))
        x = h * mlp_scales[-1][:, None] * layer.post_attention_layernorm.weight
        adapter = layer.mlp.adapter
        acts = adapter.encode(x)
        error = layer.mlp.base_mlp(x) + adapter.b_dec
        errors.append(error)
        h = h + error + acts @ adapter.W_dec.T
        positions, ids_active = (acts > 0).nonzero(as_tuple=True)
        features.append(torch.stack([torch.full_like(positions, index), positions, ids_active], dim=1))
        activations.append(acts[positions, ids_active])
    final_scale = _rms_scale(body.norm, h)
    logits = inner.lm_head(h * final_scale[:, None] * body.norm.weight)[-1]
    return FrozenPrompt(ids, embeddings, torch.stack(attn_scales), torch.stack(mlp_scales), final_scale,
                        torch.stack(patterns), torch.stack(errors), torch.stack(biases), torch.cat(features),
                        torch.cat(activations), logits)


def _value_bias(attention) -> torch.Tensor:
    """o_proj(b_v): what the value biases add at every position (pattern rows sum to 1)."""
    n_heads, head_dim = attention.config.num_attention_heads, attention.head_dim
    bias = attention.v_proj.bias
    if bias is None:
        return torch.zeros(attention.o_proj.out_features, device=attention.o_proj.weight.device,
                           dtype=attention.o_proj.weight.dtype)
    bias = bias.view(-1, head_dim).repeat_interleave(n_heads // (bias.shape[0] // head_dim), dim=0)
    return attention.o_proj(bias.reshape(-1))


def _attend(attention, pattern: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Frozen-pattern attention without the value bias: x [B, P, d] (already normed) -> [B, P, d]."""
    n_heads, head_dim = attention.config.num_attention_heads, attention.head_dim
    batch, n_pos, _ = x.shape
    values = (x @ attention.v_proj.weight.T).view(batch, n_pos, -1, head_dim)
    values = values.repeat_interleave(n_heads // values.shape[2], dim=2)
    mixed = torch.einsum("hpq,bqhd->bphd", pattern[:, :n_pos, :n_pos], values)
    return mixed.reshape(batch, n_pos, n_heads * head_dim) @ attention.o_proj.weight.T


# ----------------------------------------------------------------------------------------------------------
# The linear replay


class Replay:
    """The frozen (linear) replacement model of one prompt: run it from any node values."""

    def __init__(self, model, state: FrozenPrompt, target_token: int, demean: bool = True):
        inner = unwrap(model)
        self.body = inner.model
        self.state = state
        self.adapters = [layer.mlp.adapter for layer in self.body.layers]
        unembed = inner.lm_head.weight
        direction = unembed[target_token] - (unembed.mean(0) if demean else 0)
        self.logit_direction = (direction * self.body.norm.weight).detach()
        self.target_token = int(target_token)
        self.demean = demean
        self.encoders = torch.stack([a.W_enc * layer.post_attention_layernorm.weight
                                     for a, layer in zip(self.adapters, self.body.layers)])

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
            layer = self.body.layers[index]
            x = h * (state.attn_scale[index, :n_pos, None] * layer.input_layernorm.weight)
            h = h + _attend(layer.self_attn, state.patterns[index], x) + biases[index]
            mids.append(h)
            if index == len(errors):
                break
            positions, ids = self.layer_features(index, n_pos)
            adapter = self.adapters[index]
            acts = activations[index]
            if recompute:
                acts = self.preactivations(index, h, positions, ids, with_bias=True)
            values.append(acts)
            writes = torch.zeros_like(h)
            writes = writes.index_add(1, positions, acts[..., None] * adapter.W_dec.T[ids])
            h = h + errors[index] + writes
        return mids, h

    def layer_features(self, layer: int, n_pos: int | None = None):
        features = self.state.features
        keep = features[:, 0] == layer
        if n_pos is not None:
            keep &= features[:, 1] < n_pos
        return features[keep, 1], features[keep, 2]

    def preactivations(self, layer, mid, positions, ids, with_bias=False):
        """Pre-activations of the given features from the residual ``mid`` [B, P, d] -> [B, n]."""
        norm = self.body.layers[layer].post_attention_layernorm
        encoder = self.adapters[layer].W_enc[ids] * norm.weight  # [n, d]
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
        biases = [copy(state.attn_bias[i].expand(n_pos, -1)) for i in range(min(n_layers + 1, state.n_layers))]
        return embeddings, errors, activations, biases

    def layer_activations(self, layer: int, n_pos: int | None = None) -> torch.Tensor:
        features = self.state.features
        keep = features[:, 0] == layer
        if n_pos is not None:
            keep &= features[:, 1] < n_pos
        return self.state.activations[keep]

    def node_values(self, n_pos):
        return self.state.embeddings[:n_pos], self.state.errors[:, :n_pos]


# ----------------------------------------------------------------------------------------------------------
# The graph


@dataclass
class AttributionGraph:
    """Direct-effect graph of one prompt. ``adjacency[t, s]`` = edge s -> t (rows: targets, columns: sources);
    nodes in the order features | errors (layer-major, L*P) | tokens (P) | logit (1)."""

    state: FrozenPrompt
    adjacency: torch.Tensor
    bias: torch.Tensor
    """[N] constant (non-node) contribution to each row: attention value biases, plus b_enc for features."""
    target_token: int
    demean: bool
    logit_value: float
    """The target logit (demeaned if chosen) in the real model on the prompt."""
    probability: float
    """Softmax probability of the target token in the real model."""
    n_active_features: int = -1
    """Features active on the prompt (more than ``n_features`` when max_feature_nodes folded some into errors)."""

    @property
    def n_features(self) -> int:
        return self.state.features.shape[0]

    @property
    def n_layers(self) -> int:
        return self.state.n_layers

    @property
    def n_pos(self) -> int:
        return self.state.n_pos

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_index(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_index + 1

    def error_index(self, layer: int, pos: int) -> int:
        return self.error_start + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.token_start + pos

    def node_values(self) -> torch.Tensor:
        """Each node's value: activation for features, the logit for the logit, NaN for vector nodes."""
        values = torch.full((self.n_nodes,), float("nan"), dtype=self.adjacency.dtype)
        values[: self.n_features] = self.state.activations.cpu().to(values.dtype)
        values[self.logit_index] = self.logit_value
        return values


def attribute(model, input_ids, target_token: int, batch_size: int = 128, demean: bool = True,
              progress: bool = False, method: str = "transpose",
              max_feature_nodes: int | None = None) -> AttributionGraph:
    """The attribution graph of ``target_token``'s logit at the last position of ``input_ids``.

    ``method="transpose"`` (default) runs the replay's transposed linear map by hand, batched over target nodes
    (no forward pass needed: the replay is linear); ``method="autograd"`` gets the same edges from autograd on
    per-target copies of the leaves (slower; kept as an independent cross-check).

    ``max_feature_nodes``: when more features are active, keep only that many as nodes, chosen greedily by
    estimated influence on the logit (circuit-tracer's strategy); the others are folded into the error node of
    their (layer, position), so every identity stays exact and ``n_active_features`` records how many there were."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if method not in ("transpose", "autograd"):
        raise ValueError(f"method must be 'transpose' or 'autograd', got {method!r}")
    state = freeze(model, input_ids)
    n_active = state.features.shape[0]
    if max_feature_nodes is not None and n_active > max_feature_nodes:
        keep = select_features_by_influence(Replay(model, state, target_token, demean), max_feature_nodes,
                                            batch_size)
        state = fold_into_errors(model, state, keep)
    replay = Replay(model, state, target_token, demean)
    n_features, n_layers, n_pos = state.features.shape[0], state.n_layers, state.n_pos
    n_nodes = n_features + n_layers * n_pos + n_pos + 1
    adjacency = torch.zeros(n_nodes, n_nodes, dtype=state.embeddings.dtype)
    bias = torch.zeros(n_nodes, dtype=state.embeddings.dtype)
    offsets = _feature_offsets(state)
    # targets: every active feature (its pre-activation, read before its layer's MLP), then the logit (read from
    # the final residual, "layer" n_layers); sorted by (layer, position), so a chunk needs few layers and positions
    logit_target = torch.tensor([[n_layers, n_pos - 1, -1]], device=state.features.device)
    targets_all = torch.cat([state.features, logit_target])
    chunks = range(0, n_features + 1, batch_size)
    for start in tqdm(chunks, desc="attribution", disable=not progress, leave=False):
        rows = list(range(start, min(start + batch_size, n_features + 1)))
        targets = targets_all[rows]
        rows = [r if r < n_features else n_nodes - 1 for r in rows]
        if method == "transpose":
            out, row_bias = _transpose_rows(replay, targets, offsets)
            adjacency[rows, :out.shape[1]] = out.cpu().to(adjacency.dtype)
            bias[rows] += row_bias.cpu().to(bias.dtype)
        elif int(targets[0, 0]) == n_layers:
            leaves = replay.leaves(1, n_layers, n_pos)
            _, final = replay.run(*leaves)
            _fill_rows(adjacency, bias, rows, replay.logit(final), leaves, state, offsets, n_pos)
        else:
            features = targets[targets[:, 0] < n_layers]
            feature_rows = rows[:features.shape[0]]
            top_layer, top_pos = int(features[:, 0].max()), int(features[:, 1].max()) + 1
            leaves = replay.leaves(len(feature_rows), top_layer, top_pos)
            mids, _ = replay.run(*leaves, n_layers=top_layer + 1, n_pos=top_pos)
            values = replay.target_preactivations(mids, features)
            _fill_rows(adjacency, bias, feature_rows, values, leaves, state, offsets, top_pos)
            if len(feature_rows) < len(rows):  # the logit shares the last chunk
                leaves = replay.leaves(1, n_layers, n_pos)
                _, final = replay.run(*leaves)
                _fill_rows(adjacency, bias, rows[-1:], replay.logit(final), leaves, state, offsets, n_pos)
    if n_features:
        encoder_bias = torch.stack([replay.adapters[l].b_enc[f] for l, _, f in state.features.tolist()])
        bias[:n_features] += encoder_bias.detach().cpu().to(bias.dtype)
    logits = state.logits.double()
    logit_value = float(state.logits[target_token] - (state.logits.mean() if demean else 0))
    probability = float(logits.softmax(-1)[target_token])
    return AttributionGraph(state, adjacency, bias, int(target_token), demean, logit_value, probability,
                            n_active)


@torch.no_grad()
def select_features_by_influence(replay: Replay, max_nodes: int, batch_size: int) -> torch.Tensor:
    """Indices of at most ``max_nodes`` active features, explored greedily: compute the rows of the unexplored
    features with the largest estimated influence on the logit (from the rows known so far), repeat."""
    state = replay.state
    n = state.features.shape[0]
    offsets = _feature_offsets(state)
    logit_target = torch.tensor([[state.n_layers, state.n_pos - 1, -1]], device=state.features.device)
    logit_row, _ = _transpose_rows(replay, logit_target, offsets)
    direct = normalize_rows(logit_row.float().cpu())[0, :n]
    explored: list[int] = []
    rows = torch.zeros(max_nodes, n, dtype=torch.float32)  # normalised rows of the explored features
    while len(explored) < max_nodes:
        influence, current = direct.clone(), direct.clone()
        for _ in range(state.n_layers):
            current = current[explored] @ rows[:len(explored)] if explored else torch.zeros_like(direct)
            influence += current
        influence[explored] = -1.0
        count = min(batch_size, max_nodes - len(explored))
        chosen = influence.topk(count).indices
        chosen = chosen[influence[chosen] > 0].tolist()
        if not chosen:
            break
        out, _ = _transpose_rows(replay, state.features[chosen], offsets)
        rows[len(explored):len(explored) + len(chosen)] = normalize_rows(out.float().cpu())[:, :n]
        explored.extend(chosen)
    return torch.tensor(sorted(explored), dtype=torch.long)


@torch.no_grad()
def fold_into_errors(model, state: FrozenPrompt, keep: torch.Tensor) -> FrozenPrompt:
    """The same frozen prompt with only the features ``keep`` as nodes: the others' decoder writes join the error
    node of their (layer, position) (all identities stay exact; those features just stop being explained)."""
    body = unwrap(model).model
    errors = state.errors.clone()
    dropped = torch.ones(state.features.shape[0], dtype=torch.bool)
    dropped[keep] = False
    for (layer, pos, feature), value in zip(state.features[dropped].tolist(), state.activations[dropped]):
        errors[layer, pos] += value * body.layers[layer].mlp.adapter.W_dec[:, feature]
    kept = keep.to(state.features.device)
    return FrozenPrompt(state.input_ids, state.embeddings, state.attn_scale, state.mlp_scale, state.final_scale,
                        state.patterns, errors, state.attn_bias, state.features[kept], state.activations[kept],
                        state.logits)


def _attend_transposed(attention, pattern: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Transpose of ``_attend``: gradient at the attention output [B, P, d] -> at its normed input [B, P, d]."""
    n_heads, head_dim = attention.config.num_attention_heads, attention.head_dim
    batch, n_pos, _ = grad.shape
    mixed = (grad @ attention.o_proj.weight).view(batch, n_pos, n_heads, head_dim)
    values = torch.einsum("hpq,bphd->bqhd", pattern[:, :n_pos, :n_pos], mixed)
    n_kv = attention.v_proj.weight.shape[0] // head_dim
    values = values.reshape(batch, n_pos, n_kv, n_heads // n_kv, head_dim).sum(3)  # heads sharing a kv head
    return values.reshape(batch, n_pos, n_kv * head_dim) @ attention.v_proj.weight


@torch.no_grad()
def _transpose_rows(replay: Replay, targets: torch.Tensor, offsets):
    """Edges into ``targets`` [B, 3] = (layer, position, feature id; layer == n_layers for the logit) by one pass
    of the replay's transposed map: inject each target's read-out vector at its layer and position, walk down."""
    state = replay.state
    n_layers, total_pos = state.n_layers, state.n_pos
    n_features = state.features.shape[0]
    layers, positions, ids = targets.unbind(1)
    n_pos = int(positions.max()) + 1
    top = int(layers.max())
    batch = torch.arange(targets.shape[0], device=targets.device)
    readout = torch.empty(targets.shape[0], state.embeddings.shape[1], dtype=state.embeddings.dtype,
                          device=state.embeddings.device)
    is_logit = layers == n_layers
    if is_logit.any():
        readout[is_logit] = replay.logit_direction * state.final_scale[-1]
    features = ~is_logit
    if features.any():
        readout[features] = (replay.encoders[layers[features], ids[features]]
                             * state.mlp_scale[layers[features], positions[features], None])
    grad = torch.zeros(targets.shape[0], n_pos, readout.shape[1], dtype=readout.dtype, device=readout.device)
    if top == n_layers:
        grad[batch[is_logit], positions[is_logit]] += readout[is_logit]
    out = torch.zeros(targets.shape[0], n_features + n_layers * total_pos + total_pos, dtype=readout.dtype,
                      device=readout.device)
    row_bias = torch.zeros(targets.shape[0], dtype=readout.dtype, device=readout.device)
    for layer in reversed(range(min(top, n_layers - 1) + 1)):
        # grad: with respect to the residual after this layer's MLP write
        if layer < top:
            errors = state.errors[layer, :n_pos]
            column = n_features + layer * total_pos
            out[:, column:column + n_pos] = (grad * errors).sum(-1)
            feature_positions, feature_ids = replay.layer_features(layer, n_pos)
            decoder = replay.adapters[layer].W_dec.T[feature_ids]  # [n, d]
            values = replay.layer_activations(layer, n_pos)
            start = offsets[layer]
            out[:, start:start + len(feature_ids)] = (grad[:, feature_positions] * decoder).sum(-1) * values
        here = layers == layer
        if here.any():
            grad[batch[here], positions[here]] += readout[here]
        row_bias += grad.sum(1) @ state.attn_bias[layer]
        block = replay.body.layers[layer]
        scale = state.attn_scale[layer, :n_pos, None] * block.input_layernorm.weight
        grad = grad + _attend_transposed(block.self_attn, state.patterns[layer], grad) * scale
    token_start = n_features + n_layers * total_pos
    out[:, token_start:token_start + n_pos] = (grad * state.embeddings[:n_pos]).sum(-1)
    return out, row_bias


def _feature_offsets(state: FrozenPrompt) -> list[int]:
    """Index of each layer's first feature node (features are sorted by layer)."""
    counts = torch.bincount(state.features[:, 0], minlength=state.n_layers).tolist()
    return [sum(counts[:i]) for i in range(state.n_layers)]


def _fill_rows(adjacency, bias, rows, values, leaves, state, offsets, n_pos) -> None:
    """Backward from ``values`` [B] (one target per batch copy) and write edges = grad * value into ``rows``."""
    embeddings, errors, activations, biases = leaves
    flat = [embeddings, *errors, *activations, *biases]
    grads = torch.autograd.grad(values.sum(), flat, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, flat)]
    n_err, n_act = len(errors), len(activations)
    g_emb, g_err, g_act, g_bias = grads[0], grads[1:1 + n_err], grads[1 + n_err:1 + n_err + n_act], grads[1 + n_err + n_act:]
    rows = torch.as_tensor(rows)
    n_features, n_layers, total_pos = state.features.shape[0], state.n_layers, state.n_pos
    token_start = n_features + n_layers * total_pos
    with torch.no_grad():
        token_edges = (g_emb * embeddings).sum(-1).cpu()
        adjacency[rows[:, None], token_start + torch.arange(n_pos)] = token_edges.to(adjacency.dtype)
        for layer in range(n_err):
            error_edges = (g_err[layer] * errors[layer]).sum(-1).cpu()
            columns = n_features + layer * total_pos + torch.arange(n_pos)
            adjacency[rows[:, None], columns] = error_edges.to(adjacency.dtype)
            feature_edges = (g_act[layer] * activations[layer]).cpu()
            columns = offsets[layer] + torch.arange(feature_edges.shape[1])
            adjacency[rows[:, None], columns] = feature_edges.to(adjacency.dtype)
        for layer_grad, layer_bias in zip(g_bias, biases):
            bias[rows] += (layer_grad * layer_bias).sum((-1, -2)).cpu().to(bias.dtype)


# ----------------------------------------------------------------------------------------------------------
# Checks: replay with nodes removed, total effects


@torch.no_grad()
def replay_logit(model, graph: AttributionGraph, zero: list[int] = (), recompute: bool = False) -> float:
    """The target logit of the frozen replacement model with the nodes ``zero`` (graph indices) set to 0.

    ``recompute=False``: features keep their prompt values (the graph's direct-effect model);
    ``recompute=True``: active features follow their pre-activations linearly (the ReLU's local linearisation),
    so removing a node also moves every feature downstream of it."""
    state = graph.state
    replay = Replay(model, state, graph.target_token, graph.demean)
    embeddings, errors, activations, biases = replay.leaves(1, state.n_layers, state.n_pos)
    embeddings = embeddings.detach()
    errors, activations, biases = ([t.detach() for t in group] for group in (errors, activations, biases))
    offsets = _feature_offsets(state)
    clamp: dict[int, set[int]] = {}
    for node in zero:
        node = int(node)
        if node < graph.n_features:
            layer = int(state.features[node, 0])
            activations[layer][0, node - offsets[layer]] = 0.0
            clamp.setdefault(layer, set()).add(node - offsets[layer])
        elif node < graph.token_start:
            layer, pos = divmod(node - graph.error_start, graph.n_pos)
            errors[layer][0, pos] = 0.0
        elif node < graph.logit_index:
            embeddings[0, node - graph.token_start] = 0.0
        else:
            raise ValueError("the logit node cannot be removed")
    if recompute and clamp:
        replay = _ClampedReplay(replay, clamp)
    _, final = replay.run(embeddings, errors, activations, biases, recompute=recompute)
    return float(replay.logit(final)[0])


class _ClampedReplay:
    """A replay whose recomputed features keep some given ones at zero."""

    def __init__(self, replay: Replay, clamp: dict[int, set[int]]):
        self.replay, self.clamp = replay, clamp

    def __getattr__(self, name):
        return getattr(self.replay, name)

    def run(self, *args, **kwargs):
        original = self.replay.preactivations

        def clamped(layer, mid, positions, ids, with_bias=False):
            pre = original(layer, mid, positions, ids, with_bias)
            for column in self.clamp.get(layer, ()):
                pre[..., column] = 0.0
            return pre

        self.replay.preactivations = clamped
        try:
            return Replay.run(self.replay, *args, **kwargs)
        finally:
            del self.replay.preactivations


def total_effects(graph: AttributionGraph, with_bias: bool = False):
    """[N] each node's total (direct + through downstream features) effect on the logit, in the replay whose
    active features follow their pre-activations linearly. Removing node s changes the logit by -total[s].
    ``with_bias``: also return the constants' (attention value biases, b_enc) total effect on the logit."""
    a = graph.adjacency.double()
    n = graph.n_features
    activations = graph.state.activations.double().cpu()
    per_unit = a[:n, :n] / activations[None, :]  # d pre_t / d act_s
    direct = a[graph.logit_index, :n] / activations
    # g = direct + g @ per_unit  (per-unit total effect of each feature on the logit)
    # features are sorted by layer and read only earlier layers: I - per_unit is unit lower-triangular
    system = (torch.eye(n, dtype=a.dtype) - per_unit).T
    g = torch.linalg.solve_triangular(system, direct[:, None], upper=True, unitriangular=True)[:, 0]
    totals = a[graph.logit_index] + g @ a[:n]
    if not with_bias:
        return totals
    bias = graph.bias.double()
    return totals, float(bias[graph.logit_index] + g @ bias[:n])


# ----------------------------------------------------------------------------------------------------------
# Influence, scores, pruning (circuit-tracer's definitions)


def normalize_rows(matrix: torch.Tensor) -> torch.Tensor:
    """|matrix| with each row scaled to sum to 1 (zero rows stay zero)."""
    absolute = matrix.abs()
    return absolute / absolute.sum(1, keepdim=True).clamp(min=1e-10)


def propagate(normalized: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weights @ (A + A^2 + ...): the graph is a DAG, so the series ends after at most N terms."""
    current = weights @ normalized
    influence = current.clone()
    for _ in range(normalized.shape[0]):
        if not current.any():
            return influence
        current = current @ normalized
        influence += current
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def logit_weights(graph: AttributionGraph) -> torch.Tensor:
    weights = torch.zeros(graph.n_nodes, dtype=graph.adjacency.dtype)
    weights[graph.logit_index] = 1.0
    return weights


def node_influence(graph: AttributionGraph) -> torch.Tensor:
    """[N] share of the logit's (abs, row-normalised) attribution flowing through each node, all path lengths."""
    return propagate(normalize_rows(graph.adjacency), logit_weights(graph))


def graph_scores(graph: AttributionGraph, influence: torch.Tensor | None = None) -> dict:
    """Replacement and completeness scores (circuit-tracer) plus an exact signed decomposition of the logit.

    * replacement_score: token influence / (token + error influence): share of the end-to-end path mass from
      the logit that ends in input tokens rather than error nodes.
    * completeness: mean over nodes of the share of their incoming |edges| from non-error nodes, weighted by
      (influence + logit weight).
    * signed: logit = tokens + errors + bias (total effects, the replay with linear active features);
      ``error_share_signed`` = errors / logit; ``direct`` shares: the logit's direct inputs by node type."""
    normalized = normalize_rows(graph.adjacency)
    weights = logit_weights(graph)
    influence = propagate(normalized, weights) if influence is None else influence
    errors = slice(graph.error_start, graph.token_start)
    tokens = slice(graph.token_start, graph.logit_index)
    token_influence, error_influence = float(influence[tokens].sum()), float(influence[errors].sum())
    non_error = 1 - normalized[:, errors].sum(1)
    has_inputs = normalized.sum(1) > 0
    output = (influence + weights) * has_inputs
    completeness = float((non_error * output).sum() / output.sum())
    total, bias_total = total_effects(graph, with_bias=True)
    direct = graph.adjacency[graph.logit_index].double()
    return {
        "replacement_score": token_influence / max(token_influence + error_influence, 1e-12),
        "completeness": completeness,
        "logit": graph.logit_value,
        "signed_total": {"tokens": float(total[tokens].sum()), "errors": float(total[errors].sum()),
                         "bias": bias_total},
        "signed_direct": {"features": float(direct[:graph.n_features].sum()), "errors": float(direct[errors].sum()),
                          "tokens": float(direct[tokens].sum()), "bias": float(graph.bias[graph.logit_index])},
        "error_share_signed": float(total[errors].sum()) / graph.logit_value if graph.logit_value else float("nan"),
        "error_share_abs_direct": float(normalized[graph.logit_index, errors].sum()),
        "feature_share_abs_direct": float(normalized[graph.logit_index, :graph.n_features].sum()),
    }


def _threshold(scores: torch.Tensor, keep_mass: float) -> float:
    """Smallest score among the top scores that together carry ``keep_mass`` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    if ordered.numel() == 0 or float(ordered.sum()) <= 0:
        return float("inf")
    cumulative = ordered.cumsum(0) / ordered.sum()
    index = min(int(torch.searchsorted(cumulative, torch.tensor(keep_mass, dtype=cumulative.dtype))),
                ordered.numel() - 1)
    return float(ordered[index])


@dataclass
class PrunedGraph:
    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    influence: torch.Tensor
    """[N] node influence in the full graph."""


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
    """Keep the nodes carrying ``node_threshold`` of the influence on the logit (tokens and the logit always),
    then the edges carrying ``edge_threshold`` of the edge influence; drop nodes left without edges."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    weights = logit_weights(graph)
    influence = node_influence(graph)
    node_mask = influence >= _threshold(influence, node_threshold)
    node_mask[graph.token_start:] = True
    pruned = graph.adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_rows(pruned)
    edge_scores = normalized * (propagate(normalized, weights) + weights)[:, None]
    edge_mask = (edge_scores >= _threshold(edge_scores, edge_threshold)) & (edge_scores > 0)
    inner = graph.token_start  # features and errors need an outgoing edge; features an incoming one too
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:inner] &= edge_mask[:, :inner].any(0)
        node_mask[:graph.n_features] &= edge_mask[:graph.n_features].any(1)
        if torch.equal(before, node_mask):
            return PrunedGraph(node_mask, edge_mask, influence)


# ----------------------------------------------------------------------------------------------------------
# The hesitation study


@dataclass
class HesitationPrompt:
    input_ids: list[int]
    """Prompt + the target's own response, cut just before a "wait" token."""
    problem_index: int
    prompt_tokens: int
    """How many of ``input_ids`` are the problem's prompt (the rest is the target's response)."""
    source: str = "rollout"
    """"rollout": the target's own greedy generation; "trace": a reference reasoning trace (held-out data)."""


def hesitation_token(tokenizer, word: str = " wait") -> int:
    """The token id of the hesitation ``word`` (the pair's ``hesitation_word``): notebook 05 attributes its logit,
    notebook 06 collects feature statistics before it."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens for this tokenizer; the study needs a single-token "
                         "hesitation word: set the pair's hesitation_word to a single-token spelling")
    return ids[0]


def cut_at_token(tokenizer, prompt: str, response: str, token: int, problem_index: int,
                 max_cuts: int, source: str = "rollout") -> list[HesitationPrompt]:
    """Prompts ending just before each occurrence of ``token`` in the response (at most ``max_cuts``)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
    cuts = [i for i in range(len(prompt_ids), len(ids)) if ids[i] == token][:max_cuts]
    return [HesitationPrompt(ids[:i], problem_index, len(prompt_ids), source) for i in cuts]


def trace_prompts(tokenizer, references: list[tuple[str, str]], n_prompts: int, max_per_problem: int = 2,
                  word: str = " wait") -> list[HesitationPrompt]:
    """Fallback prompts from reference reasoning (``tdlib.pairs.reference_responses``: (prompt, response) text
    pairs the target was trained to imitate), cut before each hesitation token: for targets that rarely
    hesitate within the generation budget (the smoke organism)."""
    token = hesitation_token(tokenizer, word)
    found: list[HesitationPrompt] = []
    for index, (prompt, response) in enumerate(references):
        found.extend(cut_at_token(tokenizer, prompt, response, token, index, max_per_problem, source="trace"))
        if len(found) >= n_prompts:
            break
    return found[:n_prompts]


def hesitation_prompts(target, tokenizer, prompts: list[str], n_prompts: int, max_per_problem: int = 2,
                       max_new_tokens: int = 200, word: str = " wait", batch_size: int = 64,
                       progress: bool = True) -> list[HesitationPrompt]:
    """The target's greedy continuations of ``prompts``, cut before each "wait": up to ``n_prompts``."""
    from .generate import generate_greedy

    token = hesitation_token(tokenizer, word)
    found: list[HesitationPrompt] = []
    step = max(batch_size, 2 * n_prompts)
    for start in range(0, len(prompts), step):
        chunk = prompts[start:start + step]
        generation = generate_greedy(target, tokenizer, chunk, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, progress=progress, desc="target rollouts")
        for offset, (prompt, response) in enumerate(zip(chunk, generation.responses)):
            found.extend(cut_at_token(tokenizer, prompt, response, token, start + offset, max_per_problem))
        if len(found) >= n_prompts:
            break
    return found[:n_prompts]


_TOTAL = re.compile(r"=(-?\d+)")


def negative_total_positions(tokenizer, ids: list[int], prompt_tokens: int) -> list[bool]:
    """For each position: is the most recent running total written in the response (``=<n>``) negative?"""
    flags, text = [], ""
    for i, token in enumerate(ids):
        if i >= prompt_tokens:
            text += tokenizer.decode([token])
        totals = _TOTAL.findall(text)
        flags.append(bool(totals) and int(totals[-1]) < 0)
    return flags


GROUPS = ("output", "template", "suppressor")
"""output: mostly a direct edge to the logit, promoting "wait"; suppressor: mostly direct, lowering it;
template: most influence goes through other features (reads the context that triggers hesitation)."""


@dataclass
class StudyConfig:
    """The hesitation study's knobs."""

    influence_mass: float = 0.8
    """Select the fewest features carrying this share of the total feature influence on the "wait" logit."""
    output_direct_share: float = 0.5
    """A selected feature whose direct edge to the logit carries at least this share of its influence is an
    "output" feature when that edge promotes "wait" (a "suppressor" when it lowers it); below it, "template"
    (acts through other features)."""
    batch_size: int = 128
    """Target nodes per backward pass."""
    demean: bool = True
    """Attribute the demeaned logit (logit minus the mean logit over the vocabulary)."""
    max_feature_nodes: int | None = 2048
    """At most this many feature nodes per graph (chosen by influence; the rest join the error nodes)."""

    def __post_init__(self):
        if not 0 < self.influence_mass <= 1 or not 0 <= self.output_direct_share <= 1:
            raise ValueError("influence_mass must be in (0, 1] and output_direct_share in [0, 1]")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class FeatureStats:
    influence: float = 0.0
    direct: float = 0.0
    signed_direct: float = 0.0
    activation: float = 0.0
    fires: int = 0
    at_last: float = 0.0
    at_negative: float = 0.0
    prompts: set = field(default_factory=set)
    tokens: dict = field(default_factory=dict)


def hesitation_study(model, tokenizer, prompts: list[HesitationPrompt], token: int,
                     config: StudyConfig = StudyConfig(), progress: bool = True) -> dict:
    """Attribute the "wait" logit on every prompt; aggregate influence per feature (layer, id); select and group
    the features carrying ``config.influence_mass`` of it. Returns a JSON-ready dict."""
    if not prompts:
        raise ValueError("no hesitation prompts: the target never said the hesitation word in its rollouts")
    stats: dict[tuple[int, int], FeatureStats] = {}
    per_prompt = []
    for number, prompt in enumerate(tqdm(prompts, desc="attribution graphs", disable=not progress)):
        graph = attribute(model, prompt.input_ids, token, config.batch_size, config.demean,
                          max_feature_nodes=config.max_feature_nodes)
        influence = node_influence(graph)
        scores = graph_scores(graph, influence)
        direct = normalize_rows(graph.adjacency)[graph.logit_index]
        negative = negative_total_positions(tokenizer, prompt.input_ids, prompt.prompt_tokens)
        last = graph.n_pos - 1
        for i, (layer, pos, feature) in enumerate(graph.state.features.tolist()):
            entry = stats.setdefault((layer, feature), FeatureStats())
            activation = float(graph.state.activations[i])
            entry.influence += float(influence[i])
            entry.direct += float(direct[i])
            entry.signed_direct += float(graph.adjacency[graph.logit_index, i])
            entry.activation += activation
            entry.fires += 1
            entry.at_last += activation * (pos == last)
            entry.at_negative += activation * negative[pos]
            entry.prompts.add(number)
            word = tokenizer.decode([prompt.input_ids[pos]])
            entry.tokens[word] = entry.tokens.get(word, 0.0) + activation
        per_prompt.append({**scores, "n_tokens": graph.n_pos, "n_feature_nodes": graph.n_features,
                           "n_active_features": graph.n_active_features,
                           "p_wait": graph.probability,
                           "wait_is_top1": bool(graph.state.logits.argmax() == token)})
        del graph, influence
    return summarise(stats, per_prompt, config, len(find_layers(unwrap(model))), _width(model), model, token)


def _width(model) -> int:
    return unwrap(model).model.layers[0].mlp.adapter.W_enc.shape[0]


def select_features(stats: dict, influence_mass: float) -> list[tuple[int, int]]:
    ordered = sorted(stats, key=lambda key: -stats[key].influence)
    total = sum(s.influence for s in stats.values())
    selected, running = [], 0.0
    for key in ordered:
        if running >= influence_mass * total:
            break
        selected.append(key)
        running += stats[key].influence
    return selected


@torch.no_grad()
def decoder_logit_effect(model, layer: int, feature: int, token: int, demean: bool = True) -> float:
    """Virtual weight of a feature's decoder direction onto the (demeaned) token logit through the final norm's
    weight (the norm's 1/rms scale excluded): > 0 means the feature writes in the "wait" direction."""
    inner = unwrap(model)
    unembed = inner.lm_head.weight
    direction = (unembed[token] - (unembed.mean(0) if demean else 0)) * inner.model.norm.weight
    return float(inner.model.layers[layer].mlp.adapter.W_dec[:, feature] @ direction)


def summarise(stats, per_prompt, config: StudyConfig, n_layers: int, width: int, model, token: int) -> dict:
    selected = select_features(stats, config.influence_mass)
    total_influence = sum(s.influence for s in stats.values())
    features, groups = [], {}
    for layer, feature in selected:
        entry = stats[(layer, feature)]
        direct_share = entry.direct / entry.influence if entry.influence > 0 else 0.0
        if direct_share < config.output_direct_share:
            group = "template"
        else:
            group = "output" if entry.signed_direct > 0 else "suppressor"
        top_tokens = sorted(entry.tokens.items(), key=lambda kv: -kv[1])[:3]
        features.append({
            "layer": layer, "feature": feature, "group": group, "influence": entry.influence / len(per_prompt),
            "influence_share": entry.influence / total_influence, "direct_share": direct_share,
            "mean_direct_edge": entry.signed_direct / entry.fires,
            "decoder_wait_effect": decoder_logit_effect(model, layer, feature, token, config.demean),
            "prompts_active": len(entry.prompts) / len(per_prompt),
            "share_at_last_position": entry.at_last / entry.activation,
            "share_at_negative_total": entry.at_negative / entry.activation,
            "top_tokens": [word for word, _ in top_tokens],
        })
    for name in GROUPS:
        members = [f for f in features if f["group"] == name]
        weights = [f["influence_share"] for f in members]
        mass = sum(weights)

        def weighted(key):
            return sum(f[key] * f["influence_share"] for f in members) / mass if mass else float("nan")

        groups[name] = {
            "count": len(members), "influence_share": mass,
            "direct_share": weighted("direct_share"), "share_at_last_position": weighted("share_at_last_position"),
            "share_at_negative_total": weighted("share_at_negative_total"),
            "layers": {str(l): sum(1 for f in members if f["layer"] == l) for l in range(n_layers)},
            "decoder_promotes_wait": sum(1 for f in members if f["decoder_wait_effect"] > 0),
        }
    scores = {key: float(sum(p[key] for p in per_prompt) / len(per_prompt))
              for key in ("replacement_score", "completeness", "error_share_abs_direct", "feature_share_abs_direct",
                          "p_wait", "n_active_features", "n_feature_nodes", "n_tokens")}
    return {
        "n_prompts": len(per_prompt),
        "hesitation_features": len(selected),
        "hesitation_share": len(selected) / (n_layers * width),
        "n_features_total": n_layers * width,
        "n_features_with_influence": len(stats),
        "influence_mass": config.influence_mass,
        "completeness": scores["completeness"],
        "replacement_score": scores["replacement_score"],
        "mean_scores": scores,
        "wait_top1_share": sum(p["wait_is_top1"] for p in per_prompt) / len(per_prompt),
        "groups": groups,
        "features": features,
        "per_prompt": per_prompt,
        "cumulative_influence": _cumulative(stats),
    }


def _cumulative(stats) -> list[float]:
    values = sorted((s.influence for s in stats.values()), reverse=True)
    total = sum(values) or 1.0
    running, out = 0.0, []
    for value in values:
        running += value
        out.append(running / total)
    return out


def max_identity_error(graph: AttributionGraph) -> dict:
    """Row identities: incoming edges + bias = value, for the logit and every feature (should be ~0)."""
    sums = graph.adjacency.sum(1) + graph.bias
    values = graph.node_values()
    rows = torch.cat([torch.arange(graph.n_features), torch.tensor([graph.logit_index])])
    gaps = (sums[rows] - values[rows]).abs()
    return {"max_row_identity_error": float(gaps.max()), "logit": graph.logit_value}


def linearity_check(model, graph: AttributionGraph, n_nodes: int = 20, seed: int = 0) -> dict:
    """Remove ``n_nodes`` random nodes one at a time in the frozen replay: logit change vs the graph's direct
    effect (features fixed) and total effect (features linear). Returns the largest discrepancies."""
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.randperm(graph.logit_index, generator=generator)[:n_nodes].tolist()
    base_fixed = replay_logit(model, graph)
    base_linear = replay_logit(model, graph, recompute=True)
    totals = total_effects(graph)
    direct_gap = total_gap = 0.0
    for node in candidates:
        change = replay_logit(model, graph, [node]) - base_fixed
        direct_gap = max(direct_gap, abs(change + float(graph.adjacency[graph.logit_index, node])))
        change = replay_logit(model, graph, [node], recompute=True) - base_linear
        total_gap = max(total_gap, abs(change + float(totals[node])))
    return {"nodes_checked": len(candidates), "max_direct_effect_error": direct_gap,
            "max_total_effect_error": total_gap, "replay_vs_model_logit_error": abs(base_fixed - graph.logit_value),
            "logit_scale": abs(graph.logit_value), **max_identity_error(graph)}
