"""Attribution graphs of the adapter model, with real error nodes (the method: docs/method.md).

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

Modules (circuit-tracer's split): ``replay`` (freezing a prompt, the linear replay), ``attribute`` (the graph's
edges), ``graph`` (the graph object: influence, scores, pruning, total effects), ``checks`` (removal checks,
the linearity check) and ``hesitation`` (the hesitation study).
"""
from .attribute import attribute, fold_into_errors, select_features_by_influence
from .checks import linearity_check, max_identity_error, replay_logit
from .graph import (AttributionGraph, PrunedGraph, graph_scores, logit_weights, node_influence, normalize_rows,
                    propagate, prune, total_effects)
from .hesitation import (GROUPS, FeatureStats, HesitationPrompt, StudyConfig, cut_at_token, decoder_logit_effect,
                         hesitation_prompts, hesitation_study, hesitation_token, rule_positions,
                         select_features, summarise, trace_prompts)
from .replay import FrozenPrompt, Replay, freeze

__all__ = [
    "attribute", "fold_into_errors", "select_features_by_influence", "linearity_check", "max_identity_error",
    "replay_logit", "AttributionGraph", "PrunedGraph", "graph_scores", "logit_weights", "node_influence",
    "normalize_rows", "propagate", "prune", "total_effects", "GROUPS", "FeatureStats", "HesitationPrompt",
    "StudyConfig", "cut_at_token", "decoder_logit_effect", "hesitation_prompts", "hesitation_study",
    "hesitation_token", "rule_positions", "select_features", "summarise", "trace_prompts",
    "FrozenPrompt", "Replay", "freeze",
]
