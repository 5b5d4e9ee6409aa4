"""Notebook 05's results file (``05_attribution.json``): its schema, built here so the package that reads it back
(``tdlib.paper``, notebook 06, ``tdlib.decisions``) and the notebook that writes it share one definition."""
from __future__ import annotations

from ..paper import reported

STUDY_KEYS = ("n_prompts", "hesitation_features", "hesitation_share", "completeness", "replacement_score", "groups",
              "mechanisms", "features", "n_features_total", "n_features_with_influence", "influence_mass",
              "selected_influence_share", "mean_scores", "wait_top1_share", "shared_prefix_tokens",
              "shared_prefix_text", "shared_prefix_influence_share", "intervention_check", "contexts",
              "selection_prompts")
"""What the results keep of the selected mode's study (``summarize_evidence``'s output)."""


def _counts(groups: dict) -> dict:
    return {name: value["count"] for name, value in groups.items()}


def mode_summary(study: dict, seconds: float) -> dict:
    """One compared mode's line: its check against removals, scores, selection size and time."""
    return {"intervention_check": study["intervention_check"], "completeness": study["completeness"],
            "replacement_score": study["replacement_score"], "hesitation_features": study["hesitation_features"],
            "hesitation_share": study["hesitation_share"], "groups": _counts(study["groups"]),
            "mechanisms": _counts(study["mechanisms"]),
            "shared_prefix_influence_share": study["shared_prefix_influence_share"],
            "first_order_residual": study["mean_scores"]["error_share_signed"], "seconds": round(seconds, 1)}


def mode_agreement(studies: dict, study_seconds: dict) -> dict:
    """Per compared mode, how its graph edges agree with removals in the real model (each scale's rank
    correlations, slope and sign agreement; within prompts by how many base MLPs lie after the feature),
    completeness, the first-order residual and the time (notebook 05's comparison table)."""
    table = {}
    for name, study in studies.items():
        scales = study["intervention_check"]["scales"]
        row = {f"{scale}: {key}": summary[key] for scale, summary in scales.items()
               for key in ("within_prompt_rank_correlation", "rank_correlation", "slope", "sign_agreement")}
        row.update({f"{scale}, {depth} base MLPs after: within prompt": by_depth["within_prompt_rank_correlation"]
                    for scale, summary in scales.items() for depth, by_depth in summary["by_downstream_mlps"].items()})
        table[name] = {**row, "completeness": study["completeness"],
                       "first-order residual (error share of the logit)": study["mean_scores"]["error_share_signed"],
                       "seconds": study_seconds[name]}
    return table


def example_graph_summary(example, page_name: str) -> dict:
    """The example graph (``graph_export.example_graph``'s ``ExampleGraph``): its size, pruning, scores and the files
    that show it."""
    graph, pruned = example.graph, example.pruned
    return {"n_tokens": graph.n_pos, "n_features": graph.n_features, "mode": graph.state.mode,
            "n_active_features": graph.n_active_features, "seconds": example.seconds,
            "kept_nodes": int(pruned.node_mask.sum()), "kept_edges": int(pruned.edge_mask.sum()),
            "scores": example.scores, "json": example.path.name, "page": page_name}


def study_parameters(settings, *, node_threshold: float, edge_threshold: float, max_per_problem: int,
                     search_problems: int, compare_modes: list, selection_rule: str | None, n_candidates: int,
                     verify_min_drop: float) -> dict:
    """The parameters ``05_attribution.json`` records: the study ``settings`` (``StudyConfig``) and the rest of
    notebook 05's knobs (``search_problems``: the number of problems actually rolled out)."""
    return {"node_threshold": node_threshold, "edge_threshold": edge_threshold,
            "influence_mass": settings.influence_mass, "output_direct_share": settings.output_direct_share,
            "max_per_problem": max_per_problem, "search_problems": search_problems, "batch_size": settings.batch_size,
            "max_feature_nodes": settings.max_feature_nodes, "n_check_features": settings.n_check_features,
            "exclude_shared_prefix": settings.exclude_shared_prefix, "compare_modes": compare_modes,
            "selection_rule": selection_rule, "small_removal": settings.small_removal, "n_candidates": n_candidates,
            "verify_min_drop": verify_min_drop}


def describe_study(study: dict, seconds: float) -> str:
    """The selected set in one line, beside the paper's share (``paper_reference``)."""
    return (f"{study['hesitation_features']} hesitation features = {100 * study['hesitation_share']:.2f}% of "
            f"{study['n_features_total']} (paper: {paper_reference()['hesitation_share']:.2%}); {seconds:.0f} s for "
            f"{study['n_prompts']} graphs")


def paper_reference() -> dict:
    """The paper's hesitation study, for comparison: its selection size and share (``paper/paper_values.json``),
    found in RelP graphs without error nodes."""
    attribution = reported()["attribution"]
    return {"hesitation_features": attribution["hesitation_features"],
            "hesitation_share": attribution["hesitation_share"], "error_nodes": False, "mode": "relp"}


def mechanism_study_summary(study: dict) -> dict:
    return {"hesitation_features": study["hesitation_features"], "hesitation_share": study["hesitation_share"],
            "n_prompts": study["n_prompts"], "groups": _counts(study["groups"]), "completeness": study["completeness"]}


def attribution_results(*, study: dict, studies: dict, study_seconds: dict, selection: dict, overlap: dict,
                        mechanism_llm, analysis_model: str, prompt_sources: dict, hesitation_word: str,
                        rollout_benchmark: str, linearity_check: dict, example_graph: dict, parameters: dict,
                        ground_truth=None, benchmark=None, mechanism_studies: dict | None = None,
                        mechanism_prompts: dict | None = None, stability=None,
                        selection_overlaps_scoring: bool | None = None, seconds: float) -> dict:
    """``05_attribution.json`` (without ``config``, which ``write_results`` adds): the selected mode's study
    (``STUDY_KEYS``), the rule that chose it, every compared mode's summary, the example graph, the parameters, and
    on the organism the answer-key scores (``ground_truth``, ``benchmark``, ``mechanism_*``, ``stability``)."""
    mechanism_studies = mechanism_studies or {}
    results = {key: study[key] for key in STUDY_KEYS}
    results.update({
        "mode": study["mode"],
        "selection_rule": selection["rule"],
        "selection": selection,
        "modes": {name: mode_summary(s, study_seconds[name]) for name, s in studies.items()},
        "overlap": overlap,
        "mechanism_llm": mechanism_llm,
        "analysis_model": analysis_model,
        "prompt_sources": prompt_sources,
        "hesitation_token": hesitation_word,
        "rollout_benchmark": rollout_benchmark,
        "target_logit": "demeaned",
        "linearity_check": linearity_check,
        "example_graph": example_graph,
        "parameters": parameters,
        "ground_truth": ground_truth,
        "benchmark": benchmark,
        "mechanism_sets": {m: s["features"] for m, s in mechanism_studies.items()},
        "mechanism_prompts": mechanism_prompts or {},
        "mechanism_studies": {m: mechanism_study_summary(s) for m, s in mechanism_studies.items()},
        "stability": stability,
        "selection_overlaps_scoring": selection_overlaps_scoring,
        "paper": paper_reference(),
        "seconds": round(seconds, 1),
    })
    return results
