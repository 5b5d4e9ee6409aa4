"""The hesitation study: prompts cut before the hesitation token, attributed; features selected and grouped."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..models import find_layers, get_mlp, unwrap
from .attribute import attribute
from .capture import final_norm_weight
from .graph import graph_scores, node_influence, normalize_rows


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
    from ..generate import generate_greedy

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


def rule_positions(tokenizer, ids: list[int], prompt_tokens: int) -> list[bool]:
    """For each position: did the most recent step written in the response (``... = <n>``) take the running total
    below zero from a non-negative one? That is the organism's hesitation rule (docs/method.md); the first step
    starts from the first term, which is positive."""
    flags, text = [], ""
    for i, token in enumerate(ids):
        if i >= prompt_tokens:
            text += tokenizer.decode([token])
        totals = [int(t) for t in _TOTAL.findall(_RECHECK.sub("", text))]  # a re-check restates an old total
        flags.append(bool(totals) and totals[-1] < 0 and (len(totals) == 1 or totals[-2] >= 0))
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
    where_rule_fires: float = 0.0
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
        rule_fires = rule_positions(tokenizer, prompt.input_ids, prompt.prompt_tokens)
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
            entry.where_rule_fires += activation * rule_fires[pos]
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
    return get_mlp(unwrap(model), 0).adapter.W_enc.shape[0]


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
    unembed = inner.get_output_embeddings().weight
    direction = (unembed[token] - (unembed.mean(0) if demean else 0)) * final_norm_weight(inner)
    return float(get_mlp(inner, layer).adapter.W_dec[:, feature] @ direction)


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
            "share_where_rule_fires": entry.where_rule_fires / entry.activation,
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
            "share_where_rule_fires": weighted("share_where_rule_fires"),
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
