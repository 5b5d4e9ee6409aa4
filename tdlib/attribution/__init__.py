"""Attribution graphs of the spliced model, in four base-MLP modes (the method: docs/method.md).

The local replacement model
---------------------------
On one prompt the model is made linear by freezing, at their values on the prompt, attention patterns (softmax
outputs) of every head and every RMSNorm denominator (1 / rms); each adapter feature is a node fixed at its
activation (the ReLU is cut: an edge INTO a feature is the linear effect on its pre-activation, which equals its
activation because only active features are nodes). The ``mode`` says what happens to each base MLP:

* ``"relp"``: the adapter model; the base MLP is passed through linearly by the paper's rules (the activation as
  ``g * sigmoid(g)`` with the sigmoid frozen, the half rule on ``act(gate) * up``). For a bias-free gated MLP
  that is exact, so there is nothing left for an error node: influence runs through every base MLP.
* ``"target"``: the target itself. Patterns and norms are frozen on the target's own forward; each target MLP is
  written as the base MLP (passed through as in ``relp``) + the adapter's active features (read on the target's MLP
  inputs) + ``b_dec`` + an **error node** holding what the adapter misses there,
  ``target_mlp(x) - base_mlp(x) - adapter(x)``. An error node then means "this part of the fine-tune's change is not
  explained by a feature", and completeness measures the method.
* ``"jacobian"``: the adapter model with each base MLP passed through by its true derivative at the prompt (no half
  rule, no frozen sigmoid): every edge is a first-order estimate of what removing its source does in the model
  (attention patterns and norms still frozen). Not an exact decomposition: what the first-order pass-through
  leaves of each base MLP's output, ``mlp(x0) - J(x0) x0``, sits in error nodes, and the graph's
  ``error_share_signed`` reports it. The mode for choosing features to intervene on.
* ``"frozen"``: the adapter model with each base MLP's output (and ``b_dec``) a constant error node: no path of
  influence crosses a base MLP. Kept for comparison: on a deep model almost every path does.

Nodes (circuit-tracer order): active features ``(layer, position, feature)`` | error nodes ``(layer, position)``
| input tokens (their embedding vectors) | the target logit. Constants are not nodes: attention value biases
(``o_proj(b_v)``), the MLP branch's constants (``b_dec``, MLP biases; in ``frozen`` mode they sit in the error
node) and encoder biases ``b_enc``; they are reported as ``bias`` per row, so for every row

    sum of incoming edges + bias = the node's value        (pre-activation for features, logit for the logit)

exactly. An edge s -> t is the direct effect: d t / d value_s * value_s along paths through frozen attention,
the residual stream and (``relp``/``jacobian``/``target``) the linearised base MLPs, with no other feature in between. Edges are
computed by the replay's transposed linear map, batched over target nodes.

Scores (circuit-tracer's definitions, on |edges| row-normalised): ``replacement_score`` = share of the
end-to-end influence on the logit reaching the inputs through tokens rather than error nodes; ``completeness``
= influence-weighted mean share of each node's incoming |edges| that come from non-error nodes. Plus an exact
signed decomposition of the logit into tokens + error nodes + bias by total (end-to-end) effects.

The target logit is ``demeaned`` by default: logit of the token minus the mean logit over the vocabulary
(what the softmax sees relative to an average token); every identity holds for either choice.

Modules (circuit-tracer's split): ``capture`` and ``replay`` (freezing a prompt, the linear replay),
``attribute`` (the graph's edges), ``graph`` (the graph object: influence, scores, pruning, total effects),
``checks`` (removals in the replay, the linearity and derivative checks), ``interventions`` (removals in the real
model against the graph's predictions, at two scales), ``hesitation`` (the hesitation study) and ``selection`` (the
rule that chooses its features, decided on held-out prompts).
"""
from .attribute import attribute, fold_into_errors, select_features_by_influence
from .checks import derivative_check, linearity_check, max_identity_error, replay_logit, require_exact
from .graph import (AttributionGraph, PrunedGraph, graph_scores, logit_weights, node_influence, normalize_rows,
                    propagate, prune, total_effects)
from .hesitation import (GROUPS, FEATURE_ROLES, FeatureEvidence, HesitationPrompt, StudyConfig, StudyEvidence,
                         cut_at_token, describe_prompts, gather_evidence, gather_modes, summarize_evidence,
                         decoder_logit_effect, decoder_top_tokens, hesitation_prompts, hesitation_study,
                         hesitation_token, judge_mechanisms, rule_positions, select_features, set_overlap,
                         prompt_sources, shared_prefix_length,
                         study_prompts, summarize_study, trace_prompts)
from .interventions import (agreement, calibration_slope, intervention_records, rank_correlation, removal_effects,
                            two_scale_agreement)
from .selection import (GRADIENT, VERIFIED, GradientEvidence, agreement_on, candidate_pool, compare_rules,
                        feature_removals, features_by_drop, gradient_evidence, rule_scores, select_by_held_out_rule,
                        describe_selection, rule_rows, split_by_problem, study_modes, verified_features)
from .replay import MODES, FrozenPrompt, Replay, freeze
from .results import attribution_results, describe_study, example_graph_summary, mode_agreement, study_parameters

__all__ = [
    "attribute", "fold_into_errors", "select_features_by_influence", "derivative_check", "linearity_check",
    "max_identity_error",
    "replay_logit", "AttributionGraph", "PrunedGraph", "graph_scores", "logit_weights", "node_influence",
    "normalize_rows", "propagate", "prune", "total_effects", "GROUPS", "FEATURE_ROLES", "FeatureEvidence",
    "HesitationPrompt", "StudyConfig", "cut_at_token", "decoder_logit_effect", "decoder_top_tokens",
    "hesitation_prompts", "hesitation_study", "hesitation_token", "rule_positions", "select_features",
    "judge_mechanisms", "set_overlap", "shared_prefix_length", "summarize_study", "trace_prompts",
    "agreement", "intervention_records", "calibration_slope", "two_scale_agreement", "StudyEvidence",
    "gather_evidence", "summarize_evidence", "VERIFIED", "agreement_on", "candidate_pool", "compare_rules",
    "feature_removals", "rule_scores", "select_by_held_out_rule", "split_by_problem", "verified_features",
    "GRADIENT", "GradientEvidence", "features_by_drop", "gradient_evidence",
    "rank_correlation", "removal_effects", "MODES", "FrozenPrompt", "Replay", "freeze", "attribution_results",
    "example_graph_summary", "mode_agreement", "study_prompts", "gather_modes", "require_exact", "study_modes",
    "rule_rows", "describe_prompts", "prompt_sources", "describe_selection", "describe_study", "study_parameters",
]
