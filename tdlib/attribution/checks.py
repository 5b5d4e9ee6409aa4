"""Checks of a graph against its replay: node removals, row identities, the linearity check."""
from __future__ import annotations

import torch

from .graph import AttributionGraph, total_effects
from .replay import Replay, _feature_offsets


@torch.no_grad()
def replay_logit(model, graph: AttributionGraph, zero: list[int] = (), recompute: bool = False) -> float:
    """The target logit of the frozen replacement model with the nodes ``zero`` (graph indices) set to 0.

    ``recompute=False``: features keep their prompt values (the graph's direct-effect model);
    ``recompute=True``: active features follow their pre-activations linearly (the ReLU's local linearisation),
    so removing a node also moves every feature downstream of it."""
    state = graph.state
    replay = Replay(model, state, graph.target_token, graph.demean)
    embeddings, errors, activations, biases, mlp_biases = replay.leaves(1, state.n_layers, state.n_pos)
    embeddings = embeddings.detach()
    errors, activations, biases, mlp_biases = ([t.detach() for t in group]
                                               for group in (errors, activations, biases, mlp_biases))
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
    _, final = replay.run(embeddings, errors, activations, biases, mlp_biases, recompute=recompute)
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
