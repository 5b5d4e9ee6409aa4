"""``attribute()``: the direct-effect graph of one logit, by batched transposed passes of the frozen replay."""
from __future__ import annotations

from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ..models import anatomy
from .graph import AttributionGraph, normalize_rows
from .replay import FrozenPrompt, Replay, _attend_transposed, _feature_offsets, freeze


def attribute(model, input_ids, target_token: int, batch_size: int = 128, demean: bool = True,
              progress: bool = False, method: str = "transpose",
              max_feature_nodes: int | None = None, mode: str = "frozen") -> AttributionGraph:
    """The attribution graph of ``target_token``'s logit at the last position of ``input_ids``.

    ``mode`` (``tdlib.attribution.MODES``): how the base MLPs enter the graph: "frozen" (a constant error node
    each), "relp" (passed through linearly by the paper's rules, the adapter model's graph), "jacobian" (passed
    through by its true derivative: edges are first-order estimates of removals; the remainder is in error nodes) or
    "target" (the target's own graph: base MLP passed through, adapter features, and error nodes holding what the
    adapter misses).

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
    model = anatomy(model)  # resolved once; everything below takes these parts
    state = freeze(model, input_ids, mode)
    n_active = state.features.shape[0]
    active = (state.features, state.activations)
    selection = None
    if max_feature_nodes is not None and n_active > max_feature_nodes:
        selection = select_features_by_influence(Replay(model, state, target_token, demean), max_feature_nodes,
                                                 batch_size)
        unfolded, state = state, fold_into_errors(model, state, selection.keep)
    replay = Replay(model, state, target_token, demean)
    n_features, n_layers, n_pos = state.features.shape[0], state.n_layers, state.n_pos
    n_nodes = n_features + n_layers * n_pos + n_pos + 1
    adjacency = torch.zeros(n_nodes, n_nodes, dtype=state.embeddings.dtype)
    bias = torch.zeros(n_nodes, dtype=state.embeddings.dtype)
    offsets = _feature_offsets(state)
    if selection is not None and method == "transpose":  # every row is known already: no second set of passes
        rows = _capped_rows(selection, unfolded).to(adjacency.dtype)
        adjacency[:n_features, :rows.shape[1]] = rows[:n_features]
        adjacency[n_nodes - 1, :rows.shape[1]] = rows[-1]
        bias[:n_features] += selection.bias[:n_features].to(bias.dtype)
        bias[n_nodes - 1] += selection.bias[-1].to(bias.dtype)
        return _finish(replay, state, adjacency, bias, target_token, demean, active)
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
    return _finish(replay, state, adjacency, bias, target_token, demean, active)


def _finish(replay, state, adjacency, bias, target_token: int, demean: bool, active) -> AttributionGraph:
    """Add the features' encoder biases and wrap the graph with the logit's value and probability."""
    n_features = state.features.shape[0]
    if n_features:
        encoder_bias = torch.stack([replay.adapters[l].b_enc[f] for l, _, f in state.features.tolist()])
        bias[:n_features] += encoder_bias.detach().cpu().to(bias.dtype)
    logits = state.model_logits().double()  # the probability the model gives (after any soft-capping)
    logit_value = float(state.logits[target_token] - (state.logits.mean() if demean else 0))
    probability = float(logits.softmax(-1)[target_token])
    return AttributionGraph(state, adjacency, bias, int(target_token), demean, logit_value, probability,
                            active[0].shape[0], active[0].cpu(), active[1].cpu())


SELECTION_GROUP = 8
"""Targets per transposed pass during feature selection, sorted by (layer, position): a pass walks down from its
highest target and stops at its last position, so small groups skip most of the work for low targets (on the
135M shape 8 took selection from 12.4 s to 4.3 s; 32 gave 7.2 s, 4 gave 4.4 s)."""


class NodeSelection(NamedTuple):
    """What ``select_features_by_influence`` keeps: the chosen features and the edges it already computed."""

    keep: torch.Tensor
    """Sorted indices (into the prompt's active features) of the features kept as nodes."""
    rows: torch.Tensor
    """[len(keep) + 1, columns]: edges into each kept feature (in ``keep`` order), then into the logit, in the
    unfolded prompt's column layout (every active feature, then errors, then tokens)."""
    bias: torch.Tensor
    """[len(keep) + 1]: the attention-bias share of each of those rows (encoder biases not included)."""


@torch.no_grad()
def select_features_by_influence(replay: Replay, max_nodes: int, batch_size: int) -> NodeSelection:
    """At most ``max_nodes`` active features, explored greedily: compute the rows of the unexplored features with
    the largest estimated influence on the logit (from the rows known so far), repeat. The rows are kept, so the
    capped graph is assembled from them (``_capped_rows``) instead of being computed a second time."""
    state = replay.state
    n = state.features.shape[0]
    offsets = _feature_offsets(state)
    logit_target = torch.tensor([[state.n_layers, state.n_pos - 1, -1]], device=state.features.device)
    logit_row, logit_bias = _transpose_rows(replay, logit_target, offsets)
    logit_row, logit_bias = logit_row.cpu(), logit_bias.cpu()
    direct = normalize_rows(logit_row.float())[0, :n]
    explored: list[int] = []
    raw = torch.zeros(max_nodes, logit_row.shape[1], dtype=logit_row.dtype)  # edges into the explored features
    raw_bias = torch.zeros(max_nodes, dtype=logit_bias.dtype)
    scale = torch.zeros(max_nodes)  # 1 / sum |row|: the influence estimate uses rows normalised to sum 1
    while len(explored) < max_nodes:
        k = len(explored)
        normalized = raw[:k, :n].abs().float() * scale[:k, None]
        influence, current = direct.clone(), direct.clone()
        for _ in range(state.n_layers):
            current = current[explored] @ normalized if explored else torch.zeros_like(direct)
            influence += current
        influence[explored] = -1.0
        count = min(batch_size, max_nodes - k)
        chosen = influence.topk(count).indices
        chosen = chosen[influence[chosen] > 0].tolist()
        if not chosen:
            break
        positions = state.features[chosen, :2].tolist()  # (layer, position), one device-to-host copy
        chosen = [i for _, i in sorted(zip(positions, chosen))]
        for start in range(0, len(chosen), SELECTION_GROUP):
            group = chosen[start:start + SELECTION_GROUP]
            out, row_bias = _transpose_rows(replay, state.features[group], offsets)
            at = k + start
            raw[at:at + len(group)] = out.cpu()
            raw_bias[at:at + len(group)] = row_bias.cpu()
            scale[at:at + len(group)] = 1 / out.abs().float().sum(1).clamp(min=1e-10).cpu()
        explored.extend(chosen)
    order = torch.tensor(explored, dtype=torch.long).argsort()
    keep = torch.tensor(explored, dtype=torch.long)[order]
    return NodeSelection(keep, torch.cat([raw[:len(explored)][order], logit_row]),
                     torch.cat([raw_bias[:len(explored)][order], logit_bias]))


def _capped_rows(selection: NodeSelection, state: FrozenPrompt) -> torch.Tensor:
    """The selection's rows in the capped graph's column layout: kept features, then errors, then tokens. A dropped
    feature's edge joins the error node of its (layer, position), as ``fold_into_errors`` moves its write there
    (the replay is linear, so the error node's edge is the old one plus the dropped features')."""
    n_old = state.features.shape[0]
    rows = selection.rows
    n_errors = state.n_layers * state.n_pos
    dropped = torch.ones(n_old, dtype=torch.bool)
    dropped[selection.keep] = False
    layers, positions, _ = state.features.cpu().unbind(1)
    errors = rows[:, n_old:n_old + n_errors].clone()
    errors.index_add_(1, (layers * state.n_pos + positions)[dropped], rows[:, :n_old][:, dropped])
    return torch.cat([rows[:, selection.keep], errors, rows[:, n_old + n_errors:]], dim=1)


@torch.no_grad()
def fold_into_errors(model, state: FrozenPrompt, keep: torch.Tensor) -> FrozenPrompt:
    """The same frozen prompt with only the features ``keep`` as nodes: the others' decoder writes join the error
    node of their (layer, position) (all identities stay exact; those features just stop being explained)."""
    replay = Replay(model, state, 0)
    errors = state.errors.clone()
    dropped = torch.ones(state.features.shape[0], dtype=torch.bool, device=state.features.device)
    dropped[keep.to(dropped.device)] = False
    layers, positions, ids = state.features[dropped].unbind(1)
    values = state.activations[dropped]
    for layer in layers.unique().tolist():
        here = layers == layer
        writes = values[here, None] * replay.decoder(layer, positions[here], ids[here])
        errors[layer].index_add_(0, positions[here], writes.to(errors.dtype))
    kept = keep.to(state.features.device)
    return state.replace(errors=errors, features=state.features[kept], activations=state.activations[kept])


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
            decoder = replay.decoder(layer, feature_positions, feature_ids)  # [n, d]
            values = replay.layer_activations(layer, n_pos)
            start = offsets[layer]
            out[:, start:start + len(feature_ids)] = _dot_at_positions(grad, feature_positions, decoder) * values
            row_bias += (grad * state.mlp_bias[layer, :n_pos]).sum((1, 2))
            if state.passes_base_mlp:  # relp / jacobian / target: influence runs on through the linearised base MLP
                live = (layers > layer)[:, None] & (torch.arange(n_pos, device=grad.device)[None] <= positions[:, None])
                grad = grad + replay.base_mlp_transposed(layer, grad, live)
        here = layers == layer
        if here.any():
            grad[batch[here], positions[here]] += readout[here]
        row_bias += (grad * state.attn_bias[layer, :n_pos]).sum((1, 2))
        scale = state.attn_scale[layer, :n_pos, None] * state.attn_weight[layer]
        out_scale = state.attn_out_scale[layer, :n_pos, None] * state.attn_out_weight[layer]
        grad = grad + _attend_transposed(replay.attentions[layer], state.patterns[layer], grad * out_scale) * scale
    token_start = n_features + n_layers * total_pos
    out[:, token_start:token_start + n_pos] = (grad * state.embeddings[:n_pos]).sum(-1)
    return out, row_bias


def _dot_at_positions(grad: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``(grad[:, positions] * vectors).sum(-1)`` [B, n] for ``grad`` [B, P, d] and ``vectors`` [n, d], without
    building ``grad[:, positions]`` ([B, n, d]: 118 MB a layer for 64 targets and 800 active features of a 576-wide
    model, which made a backward batch memory-bound). The vectors are grouped by position into a zero-padded
    [positions, slots, d] block and multiplied with one batched matmul."""
    n = positions.shape[0]
    if n == 0:
        return grad.new_zeros(grad.shape[0], 0)
    counts = torch.bincount(positions, minlength=grad.shape[1])
    order = torch.argsort(positions, stable=True)
    first = torch.cumsum(counts, 0) - counts  # index in ``order`` of each position's first vector
    slots = torch.empty_like(positions)
    slots[order] = torch.arange(n, device=positions.device) - first[positions[order]]
    used = counts.nonzero().squeeze(1)
    row = torch.empty_like(counts)
    row[used] = torch.arange(used.shape[0], device=used.device)
    block = vectors.new_zeros(used.shape[0], int(counts.max()), vectors.shape[1])
    block[row[positions], slots] = vectors
    dots = torch.bmm(grad[:, used].transpose(0, 1), block.transpose(1, 2))  # [positions, B, slots]
    return dots[row[positions], :, slots].T


def _fill_rows(adjacency, bias, rows, values, leaves, state, offsets, n_pos) -> None:
    """Backward from ``values`` [B] (one target per batch copy) and write edges = grad * value into ``rows``."""
    embeddings, errors, activations, biases, mlp_biases = leaves
    biases = [*biases, *mlp_biases]
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
