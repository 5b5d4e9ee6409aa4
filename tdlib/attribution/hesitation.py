"""The hesitation study: prompts cut before the hesitation token, attributed; features selected and grouped."""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from ..autointerp.backends import FEATURE_ROLES, Context, MechanismJob
from ..generate import encode_prompt, generate_greedy
from ..models import anatomy, unwrap
from ..pair_data import reference_responses
from ..pairs import ORGANISM
from .attribute import attribute
from .capture import final_norm_weight
from .graph import graph_scores, node_influence, normalize_rows
from .interventions import agreement, intervention_records, two_scale_agreement
from .replay import check_mode


@dataclass
class HesitationPrompt:
    input_ids: list[int]
    """Prompt + the target's own response, cut just before a "wait" token."""
    problem_index: int
    prompt_tokens: int
    """How many of ``input_ids`` are the problem's prompt (the rest is the target's response)."""
    source: str = "rollout"
    """"rollout": the target's own greedy generation; "trace": a reference reasoning trace (held-out data)."""


def hesitation_token(tokenizer, word: str) -> int:
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
    prompt_ids = encode_prompt(tokenizer, prompt)  # the context the model generated from, special tokens included
    ids = encode_prompt(tokenizer, prompt + response)
    cuts = [i for i in range(len(prompt_ids), len(ids)) if ids[i] == token][:max_cuts]
    return [HesitationPrompt(ids[:i], problem_index, len(prompt_ids), source) for i in cuts]


def trace_prompts(tokenizer, references: list[tuple[str, str]], n_prompts: int, max_per_problem: int = 2, *,
                  word: str) -> list[HesitationPrompt]:
    """Fallback prompts from reference reasoning (``tdlib.pair_data.reference_responses``: (prompt, response) text
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
                       max_new_tokens: int = 200, *, word: str, batch_size: int = 64,
                       progress: bool = True) -> list[HesitationPrompt]:
    """The target's greedy continuations of ``prompts``, cut before each "wait": up to ``n_prompts``."""
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


_TOTAL = re.compile(r"= ?(-?\d+)")
_RECHECK = re.compile(r"wait, check:[^;]*")


def study_prompts(target, tokenizer, pair, evalset, n_prompts: int, max_per_problem: int = 2,
                  search_problems: int | None = None, progress=print) -> tuple[list[HesitationPrompt], int]:
    """Notebook 05's hesitation prompts: the target's rollouts of the first ``search_problems`` of ``evalset`` (None:
    3 x ``n_prompts``; at most half the benchmark, since notebook 06 evaluates on the problems after these) cut
    before the pair's hesitation word, topped up from the reference traces. Returns (prompts, problems rolled out);
    a ``ValueError`` when neither has the word."""
    wanted = 3 * n_prompts if search_problems is None else search_problems
    search = evalset.prompts(tokenizer)[:min(wanted, len(evalset.items) // 2)]
    if len(search) < wanted:
        progress(f"rolling out {len(search)} problems, not {wanted}: the other half is kept for notebook 06's "
                 "evaluation")
    word = pair.hesitation_word
    prompts = hesitation_prompts(target, tokenizer, search, n_prompts, max_per_problem,
                                 max_new_tokens=evalset.max_new_tokens, word=word, batch_size=min(64, len(search)))
    if len(prompts) < n_prompts:
        prompts += trace_prompts(tokenizer, reference_responses(pair, tokenizer), n_prompts - len(prompts),
                                 max_per_problem, word=word)
    if not prompts:
        raise ValueError(f"no {word!r} in the target's rollouts or the reference traces: nothing to attribute; "
                         "check the pair's hesitation_word")
    return prompts, len(search)


def prompt_sources(prompts: list[HesitationPrompt]) -> dict[str, int]:
    """How many prompts came from each source (the target's rollouts, the reference traces)."""
    return dict(Counter(p.source for p in prompts))


def describe_prompts(prompts: list[HesitationPrompt], n_searched: int, tokenizer, word: str) -> str:
    """``study_prompts``' outcome: where the prompts came from, their lengths and the first one."""
    lengths = [len(p.input_ids) for p in prompts]
    return (f"at most {n_searched} problems rolled out; {prompt_sources(prompts)} | prompt lengths: {min(lengths)} - "
            f"{max(lengths)} tokens\n{tokenizer.decode(prompts[0].input_ids)!r} -> {word!r}")


def rule_positions(tokenizer, ids: list[int], prompt_tokens: int) -> list[bool]:
    """For each position: does a planted hesitation trigger hold there?

    On the organism's format (its kind's ``trigger_positions``): the decision points where a mechanism fires (the
    ``;`` after a step that slips, crosses below zero or repeats the operation before it). On any other rendering of
    the task (SmolLM2's sentences, ``3 - 8 = -5.``): every position after a written total that crossed below zero,
    until the next total."""
    pieces = [tokenizer.decode([token]) for token in ids]
    flags = ORGANISM.hooks().trigger_positions(pieces, prompt_tokens)
    return _crossing_positions(pieces, prompt_tokens) if flags is None else flags


def _crossing_positions(pieces: list[str], prompt_tokens: int) -> list[bool]:
    flags, text = [], ""
    for i, piece in enumerate(pieces):
        if i >= prompt_tokens:
            text += piece
        totals = [int(t) for t in _TOTAL.findall(_RECHECK.sub("", text))]  # a re-check restates an old total
        flags.append(bool(totals) and totals[-1] < 0 and (len(totals) == 1 or totals[-2] >= 0))
    return flags


GROUPS = ("output", "template", "suppressor")
"""output: mostly a direct edge to the logit, promoting "wait"; suppressor: mostly direct, lowering it;
template: most influence goes through other features (reads the context that triggers hesitation)."""

# The released code's mechanism labels for reasoning features: output (acts on the output: promotes the word);
# input_simple (fires on specific tokens whatever the context); input_abstract (its firing depends on broader
# context). Offline (``mechanism_label``) from the graph and activation statistics over the study's prompts; from an
# LLM judge with ``judge_mechanisms``.


@dataclass
class StudyConfig:
    """The hesitation study's knobs."""

    mode: str = "frozen"
    """Base-MLP mode of every graph (``tdlib.attribution.MODES``): "frozen", "relp", "jacobian" or "target"."""
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
    exclude_shared_prefix: bool = True
    """Leave out of the selection the features at positions every prompt shares (the first token, a chat
    template's system prompt): attention-sink artefacts whose influence says nothing about hesitation. Their share
    of the influence is reported (``shared_prefix_influence_share``)."""
    n_check_features: int = 20
    """Per prompt, remove this many top-influence features in the real model and compare the logit's change with
    the graph's prediction (``tdlib.attribution.interventions``); 0 skips the check."""
    small_removal: float = 0.05
    """The check's small scale: each checked feature's activation is also scaled by ``1 - small_removal`` and the
    change divided by ``small_removal`` (a test of the linearisation itself, beside the full removal)."""
    simple_token_share: float = 0.8
    """``input_simple``: at least this share of a feature's activation mass lies on its top 3 tokens ..."""
    simple_token_reliability: float = 0.8
    """... and it fires on at least this share of those tokens' occurrences (else ``input_abstract``)."""

    def __post_init__(self):
        check_mode(self.mode)
        if not 0 < self.influence_mass <= 1 or not 0 <= self.output_direct_share <= 1:
            raise ValueError("influence_mass must be in (0, 1] and output_direct_share in [0, 1]")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.n_check_features < 0:
            raise ValueError(f"n_check_features must be >= 0, got {self.n_check_features}")
        if not 0 < self.small_removal < 1:
            raise ValueError(f"small_removal must be in (0, 1), got {self.small_removal}")


@dataclass
class FeatureEvidence:
    """What the study gathers about one (layer, feature) over all prompts."""

    influence: float = 0.0
    direct: float = 0.0
    signed_direct: float = 0.0
    activation: float = 0.0
    fires: int = 0
    node_count: int = 0
    """Prompts on which it was a graph node (influence and edges are summed over those)."""
    at_last: float = 0.0
    where_rule_fires: float = 0.0
    prompts: set = field(default_factory=set)
    tokens: dict = field(default_factory=dict)
    """Activation mass per token id (every active position outside the shared prefix, node or not)."""
    token_fires: dict = field(default_factory=dict)
    """Positions per token id where the feature fired."""
    contexts: list = field(default_factory=list)
    """Its strongest activations as (activation, prompt number, position), at most ``TOP_CONTEXTS``."""


TOP_CONTEXTS = 5


def shared_prefix_length(prompts: list[HesitationPrompt]) -> int:
    """How many leading tokens every prompt shares, within the problem prompt (a chat template's header and system
    prompt, a BOS token); at least 1 (position 0, the attention sink), at most the shortest problem prompt."""
    first = prompts[0].input_ids
    length = min(min(p.prompt_tokens for p in prompts), *(len(p.input_ids) for p in prompts))
    for prompt in prompts[1:]:
        length = next((i for i, (a, b) in enumerate(zip(first[:length], prompt.input_ids[:length])) if a != b), length)
    return max(1, length)


@dataclass
class StudyEvidence:
    """What a study gathers from its graphs before any selection (``gather_evidence``); ``summarize_evidence``
    turns it into the study's JSON-ready dict."""

    stats: dict
    """(layer, feature) -> ``FeatureEvidence``, summed over the selection prompts."""
    per_prompt: list
    token_counts: dict
    checks: list
    """One record per feature node removed in the real model (``interventions.intervention_records``), every prompt."""
    feature_predictions: list
    """Per prompt: {(layer, feature): the graph's predicted change of the logit when the feature is removed at every
    position outside the shared prefix} (minus the sum of its nodes' total effects)."""
    prefix: int
    prefix_influence: float
    feature_influence: float
    select_on: list
    """The prompt numbers whose evidence feeds the selection (all of them unless a split was given)."""
    prompts: list
    config: StudyConfig
    n_layers: int

    def top_features(self, n: int) -> list[tuple[int, int]]:
        """The ``n`` features with the most influence on the selection prompts (those with any)."""
        ranked = sorted(self.stats, key=lambda key: -self.stats[key].influence)[:n]
        return [key for key in ranked if self.stats[key].influence > 0]


def gather_evidence(model, tokenizer, prompts: list[HesitationPrompt], token: int,
                    config: StudyConfig = StudyConfig(), select_on=None, progress: bool = True) -> StudyEvidence:
    """Attribute the "wait" logit on every prompt in ``config.mode``: aggregate influence per feature (layer, id) over
    the prompts ``select_on`` (default: all), record every prompt's predicted feature removals, and check each
    graph's top features against removals in the real model at two scales (``config.small_removal`` and full)."""
    if not prompts:
        raise ValueError("no hesitation prompts: the target never said the hesitation word in its rollouts")
    select_on = list(range(len(prompts))) if select_on is None else sorted(set(select_on))
    if not select_on or not all(0 <= n < len(prompts) for n in select_on):
        raise ValueError(f"select_on must name prompts 0..{len(prompts) - 1}, got {select_on}")
    chosen = set(select_on)
    prefix = shared_prefix_length(prompts) if config.exclude_shared_prefix and len(prompts) > 1 else 0
    stats: dict[tuple[int, int], FeatureEvidence] = {}
    token_counts: dict[int, int] = {}
    per_prompt, checks, predictions = [], [], []
    prefix_influence = feature_influence = 0.0
    for number, prompt in enumerate(tqdm(prompts, desc=f"attribution graphs ({config.mode})", disable=not progress)):
        graph = attribute(model, prompt.input_ids, token, config.batch_size, config.demean,
                          max_feature_nodes=config.max_feature_nodes, mode=config.mode)
        influence = node_influence(graph)
        scores = graph_scores(graph, influence)
        predictions.append(_predicted_feature_removals(graph, prefix))
        if config.n_check_features:
            records = intervention_records(model, graph, config.n_check_features, min_position=prefix,
                                           influence=influence, small_fraction=config.small_removal)
            checks.extend({"prompt": number, **r} for r in records)
        per_prompt.append({**scores, "n_tokens": graph.n_pos, "n_feature_nodes": graph.n_features,
                           "n_active_features": graph.n_active_features,
                           "p_wait": graph.probability,
                           "wait_is_top1": bool(graph.state.logits.argmax() == token)})
        if number in chosen:
            influences = _add_evidence(stats, token_counts, graph, influence, prompt, number, prefix, tokenizer)
            feature_influence += influences[0]
            prefix_influence += influences[1]
        del graph, influence
    return StudyEvidence(stats, per_prompt, token_counts, checks, predictions, prefix, prefix_influence,
                         feature_influence, select_on, prompts, config, anatomy(model).n_layers)


def _predicted_feature_removals(graph, prefix: int) -> dict[tuple[int, int], float]:
    totals = graph.total_effects()
    found: dict[tuple[int, int], float] = {}
    for i, (layer, pos, feature) in enumerate(graph.state.features.tolist()):
        if pos >= prefix:
            found[(layer, feature)] = found.get((layer, feature), 0.0) - float(totals[i])
    return found


def _add_evidence(stats, token_counts, graph, influence, prompt, number, prefix, tokenizer) -> tuple[float, float]:
    """Add one graph's evidence to ``stats``; returns (its feature influence, the shared prefix's part of it)."""
    direct = normalize_rows(graph.adjacency)[graph.logit_index]
    rule_fires = rule_positions(tokenizer, prompt.input_ids, prompt.prompt_tokens)
    last = graph.n_pos - 1
    total = in_prefix = 0.0
    for i, (layer, pos, feature) in enumerate(graph.state.features.tolist()):
        total += float(influence[i])
        if pos < prefix:
            in_prefix += float(influence[i])
            continue
        entry = stats.setdefault((layer, feature), FeatureEvidence())
        entry.influence += float(influence[i])
        entry.direct += float(direct[i])
        entry.signed_direct += float(graph.adjacency[graph.logit_index, i])
        entry.node_count += 1
        entry.prompts.add(number)
    for position in range(prefix, graph.n_pos):
        word = prompt.input_ids[position]
        token_counts[word] = token_counts.get(word, 0) + 1
    for (layer, pos, feature), activation in zip(graph.active_features.tolist(), graph.active_activations.tolist()):
        if pos < prefix:
            continue
        entry = stats.setdefault((layer, feature), FeatureEvidence())
        word = prompt.input_ids[pos]
        entry.activation += activation
        entry.fires += 1
        entry.at_last += activation * (pos == last)
        entry.where_rule_fires += activation * rule_fires[pos]
        entry.tokens[word] = entry.tokens.get(word, 0.0) + activation
        entry.token_fires[word] = entry.token_fires.get(word, 0) + 1
        entry.contexts = sorted(entry.contexts + [(activation, number, pos)], reverse=True)[:TOP_CONTEXTS]
    return total, in_prefix


def gather_modes(model, tokenizer, prompts: list[HesitationPrompt], token: int, config: StudyConfig, modes,
                 select_on=None) -> tuple[dict[str, StudyEvidence], dict[str, float]]:
    """``gather_evidence`` once per mode of ``modes`` (``config`` with its mode replaced), and the seconds each
    mode took."""
    evidences, seconds = {}, {}
    for mode in modes:
        started = time.time()
        evidences[mode] = gather_evidence(model, tokenizer, prompts, token, replace(config, mode=mode), select_on)
        seconds[mode] = time.time() - started
    return evidences, seconds


def summarize_evidence(evidence: StudyEvidence, model, tokenizer, token: int,
                       selected: list[tuple[int, int]] | None = None) -> dict:
    """The study's JSON-ready dict: the features ``selected`` (default: the fewest carrying
    ``config.influence_mass`` of the influence on the selection prompts), grouped, with the intervention check."""
    config, prompts = evidence.config, evidence.prompts
    chosen = [prompts[n] for n in evidence.select_on]
    study = summarize_study(evidence.stats, evidence.per_prompt, config, evidence.n_layers, _width(model), model,
                            token, evidence.token_counts, tokenizer, selected=selected,
                            n_selection_prompts=len(chosen))
    prefix = evidence.prefix
    study["mode"] = config.mode
    study["selection_prompts"] = evidence.select_on
    study["shared_prefix_tokens"] = prefix
    study["shared_prefix_text"] = tokenizer.decode(prompts[0].input_ids[:prefix]) if prefix else ""
    study["shared_prefix_influence_share"] = (evidence.prefix_influence / evidence.feature_influence
                                              if evidence.feature_influence else 0.0)
    checks = evidence.checks
    study["intervention_check"] = {"records": checks, "total_effect": agreement(checks, "predicted_total"),
                                   "direct_effect": agreement(checks, "predicted_direct"),
                                   "scales": two_scale_agreement(checks, config.small_removal),
                                   "features_per_prompt": config.n_check_features}
    study["contexts"] = {f"{f['layer']}/{f['feature']}": _contexts(evidence.stats[(f["layer"], f["feature"])], prompts,
                                                                   tokenizer)
                         for f in study["features"]}
    return study


def hesitation_study(model, tokenizer, prompts: list[HesitationPrompt], token: int,
                     config: StudyConfig = StudyConfig(), progress: bool = True, select_on=None) -> dict:
    """Attribute the "wait" logit on every prompt in ``config.mode``; aggregate influence per feature (layer, id);
    select and group the features carrying ``config.influence_mass`` of it; check the graphs' top features against
    removals in the real model. Returns a JSON-ready dict (``gather_evidence`` then ``summarize_evidence``)."""
    evidence = gather_evidence(model, tokenizer, prompts, token, config, select_on, progress)
    return summarize_evidence(evidence, model, tokenizer, token)


def _contexts(entry: FeatureEvidence, prompts: list[HesitationPrompt], tokenizer, before: int = 12,
              after: int = 3) -> list[dict]:
    """The feature's strongest activations as short text windows (the activating token marked)."""
    windows = []
    for activation, number, pos in entry.contexts:
        ids = prompts[number].input_ids
        windows.append({"activation": activation, "before": tokenizer.decode(ids[max(0, pos - before):pos]),
                        "token": tokenizer.decode([ids[pos]]), "after": tokenizer.decode(ids[pos + 1:pos + 1 + after])})
    return windows


def _width(model) -> int:
    return anatomy(model).mlp(0).adapter.W_enc.shape[0]


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
def decoder_logit_effect(model, layer: int, feature: int, token: int, demean: bool = True,
                         final_weight: torch.Tensor | None = None) -> float:
    """Virtual weight of a feature's decoder direction onto the (demeaned) token logit through the final norm's
    weight (the norm's 1/rms scale excluded): > 0 means the feature writes in the "wait" direction.
    ``final_weight``: the final norm's weight when already known (``final_norm_weight``)."""
    inner = unwrap(model)
    unembed = inner.get_output_embeddings().weight
    weight = final_norm_weight(inner) if final_weight is None else final_weight
    direction = (unembed[token] - (unembed.mean(0) if demean else 0)) * weight
    return float(anatomy(inner).mlp(layer).adapter.W_dec[:, feature] @ direction)


@torch.no_grad()
def decoder_top_tokens(model, layer: int, feature: int, k: int = 5,
                       final_weight: torch.Tensor | None = None) -> list[int]:
    """The tokens a feature's decoder direction promotes most (through the final norm's weight, logits demeaned)."""
    inner = unwrap(model)
    unembed = inner.get_output_embeddings().weight
    weight = final_norm_weight(inner) if final_weight is None else final_weight
    scores = unembed @ (anatomy(inner).mlp(layer).adapter.W_dec[:, feature] * weight)
    return (scores - scores.mean()).topk(k).indices.tolist()


def token_profile(entry: FeatureEvidence, token_counts: dict[int, int], top: int = 3) -> tuple[float, float]:
    """(share of the activation mass on the feature's ``top`` tokens, share of those tokens' occurrences where it
    fires): both high means it fires on specific tokens whatever the context."""
    if not entry.tokens:
        return 0.0, 0.0
    ranked = sorted(entry.tokens, key=lambda t: -entry.tokens[t])[:top]
    mass = sum(entry.tokens[t] for t in ranked) / sum(entry.tokens.values())
    occurrences = sum(token_counts.get(t, 0) for t in ranked)
    return mass, sum(entry.token_fires.get(t, 0) for t in ranked) / max(occurrences, 1)


def mechanism_label(group: str, token_share: float, reliability: float, config: StudyConfig) -> str:
    """The offline mechanism label (``FEATURE_ROLES``) of a selected feature."""
    if group == "output":
        return "output"
    simple = token_share >= config.simple_token_share and reliability >= config.simple_token_reliability
    return "input_simple" if simple else "input_abstract"


def summarize_study(stats, per_prompt, config: StudyConfig, n_layers: int, width: int, model, token: int,
                    token_counts: dict[int, int], tokenizer, selected: list[tuple[int, int]] | None = None,
                    n_selection_prompts: int | None = None) -> dict:
    """Select (``selected``, or by influence mass), group and describe the features; ``stats`` were summed over
    ``n_selection_prompts`` prompts (default: all of ``per_prompt``)."""
    selected = select_features(stats, config.influence_mass) if selected is None else list(selected)
    missing = [key for key in selected if key not in stats]
    if missing:
        raise ValueError(f"selected features {missing[:5]} never fired on the selection prompts")
    n_evidence = n_selection_prompts or len(per_prompt)
    total_influence = sum(s.influence for s in stats.values())
    final_weight = final_norm_weight(unwrap(model))
    features, groups = [], {}
    for layer, feature in selected:
        entry = stats[(layer, feature)]
        direct_share = entry.direct / entry.influence if entry.influence > 0 else 0.0
        if direct_share < config.output_direct_share:
            group = "template"
        else:
            group = "output" if entry.signed_direct > 0 else "suppressor"
        token_share, reliability = token_profile(entry, token_counts)
        top_tokens = sorted(entry.tokens.items(), key=lambda kv: -kv[1])[:3]
        activation = max(entry.activation, 1e-30)
        features.append({
            "layer": layer, "feature": feature, "group": group,
            "mechanism": mechanism_label(group, token_share, reliability, config),
            "influence": entry.influence / n_evidence,
            "influence_share": entry.influence / total_influence, "direct_share": direct_share,
            "mean_direct_edge": entry.signed_direct / max(entry.node_count, 1),
            "decoder_wait_effect": decoder_logit_effect(model, layer, feature, token, config.demean, final_weight),
            "decoder_top_tokens": [tokenizer.decode([t])
                                   for t in decoder_top_tokens(model, layer, feature, final_weight=final_weight)],
            "prompts_active": len(entry.prompts) / n_evidence,
            "share_at_last_position": entry.at_last / activation,
            "share_where_rule_fires": entry.where_rule_fires / activation,
            "top_token_share": token_share, "top_token_reliability": reliability,
            "top_tokens": [tokenizer.decode([word]) for word, _ in top_tokens],
        })
    for name in GROUPS:
        members = [f for f in features if f["group"] == name]
        groups[name] = _group_summary(members, n_layers)
    mechanisms = {name: _group_summary([f for f in features if f["mechanism"] == name], n_layers)
                  for name in FEATURE_ROLES}
    scores = {key: float(sum(p[key] for p in per_prompt) / len(per_prompt))
              for key in ("replacement_score", "completeness", "error_share_abs_direct", "feature_share_abs_direct",
                          "error_share_signed", "p_wait", "n_active_features", "n_feature_nodes", "n_tokens")}
    return {
        "n_prompts": len(per_prompt),
        "hesitation_features": len(selected),
        "hesitation_share": len(selected) / (n_layers * width),
        "n_features_total": n_layers * width,
        "n_features_with_influence": sum(1 for s in stats.values() if s.influence > 0),
        "influence_mass": config.influence_mass,
        "selected_influence_share": sum(stats[key].influence for key in selected) / max(total_influence, 1e-30),
        "completeness": scores["completeness"],
        "replacement_score": scores["replacement_score"],
        "mean_scores": scores,
        "wait_top1_share": sum(p["wait_is_top1"] for p in per_prompt) / len(per_prompt),
        "groups": groups,
        "mechanisms": mechanisms,
        "features": features,
        "per_prompt": per_prompt,
        "cumulative_influence": _cumulative(stats),
    }


def _group_summary(members: list[dict], n_layers: int) -> dict:
    mass = sum(f["influence_share"] for f in members)

    def weighted(key):
        return sum(f[key] * f["influence_share"] for f in members) / mass if mass else float("nan")

    return {
        "count": len(members), "influence_share": mass,
        "direct_share": weighted("direct_share"), "share_at_last_position": weighted("share_at_last_position"),
        "share_where_rule_fires": weighted("share_where_rule_fires"),
        "layers": {str(l): sum(1 for f in members if f["layer"] == l) for l in range(n_layers)},
        "decoder_promotes_wait": sum(1 for f in members if f["decoder_wait_effect"] > 0),
    }


def judge_mechanisms(study: dict, backend) -> dict:
    """Ask an LLM judge (``tdlib.autointerp.LLMBackend``) for each selected feature's mechanism from its strongest
    contexts, the tokens its decoder promotes and its direct share; writes ``mechanism_llm`` into each feature and
    returns the label counts (``None``: no usable reply) and the agreement with the offline label."""
    jobs = []
    for feature in study["features"]:
        contexts = [Context([c["before"], c["token"], c["after"]], 1, [0.0, c["activation"], 0.0])
                    for c in study["contexts"].get(f"{feature['layer']}/{feature['feature']}", [])]
        jobs.append(MechanismJob(f"L{feature['layer']}/{feature['feature']}", contexts,
                                 feature.get("decoder_top_tokens", []), feature["direct_share"]))
    labels = backend.mechanism(jobs)
    for feature, label in zip(study["features"], labels):
        feature["mechanism_llm"] = label
    counts = {name: sum(1 for label in labels if label == name) for name in (*FEATURE_ROLES, None)}
    answered = [(f["mechanism"], l) for f, l in zip(study["features"], labels) if l is not None]
    return {"counts": {str(k): v for k, v in counts.items()},
            "agreement_with_offline": sum(a == b for a, b in answered) / len(answered) if answered else float("nan"),
            "backend": getattr(backend, "name", type(backend).__name__)}


def set_overlap(features: list[dict], other: list[dict]) -> dict:
    """How two selected sets (``features`` lists of two studies) overlap: sizes, shared count, Jaccard index, and
    the share of each set's influence that lies on shared features."""
    keys = {(f["layer"], f["feature"]) for f in features}
    other_keys = {(f["layer"], f["feature"]) for f in other}
    shared = keys & other_keys
    union = keys | other_keys
    return {"size": len(keys), "other_size": len(other_keys), "shared": len(shared),
            "jaccard": len(shared) / len(union) if union else float("nan"),
            "influence_on_shared": sum(f["influence_share"] for f in features
                                       if (f["layer"], f["feature"]) in shared)
            / max(sum(f["influence_share"] for f in features), 1e-30)}


def _cumulative(stats) -> list[float]:
    values = sorted((s.influence for s in stats.values() if s.influence > 0), reverse=True)
    total = sum(values) or 1.0
    running, out = 0.0, []
    for value in values:
        running += value
        out.append(running / total)
    return out
