"""Output and internal faithfulness of replacement models to the target (notebook 02; the paper's Figs. 2-3).

Text is on-policy: each held-out prompt followed by the target's own greedy response (``onpolicy_batches``).
The target runs once per batch (``target_passes``); every model is then compared with those cached outputs:

* output faithfulness: KL(target || model) and top-1 disagreement with the target's argmax, mean over the
  *scored* positions, with a bootstrap 95% interval that resamples *sequences* (seeded); also on the
  "uncertain" scored positions, where the target's top probability is <= 0.8 (the paper's second view). By
  default the scored positions are those that predict the target's response (each response token and the
  end-of-sequence after it): the prompt, chat template and system prompt are not scored, since the paper measures
  the target's own generations; ``include_prompt=True`` scores every position whose next token is real;
* internal faithfulness: NMSE of every hidden state (embedding output, then each layer's output) against the
  target's, over every real position of the text, and the KL when only a subset of layers uses the adapter
  (``subset_kl``).

Every number is computed by ``tdlib.metrics`` (the project's one definition of each metric).

The figures of these numbers are in ``tdlib.plots``.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics
from .data import pad_batch
from .generate import encode_prompt, generate_greedy
from .residual import capture_features, capture_mlp_inputs, capture_residuals
from .runs import load_named
from .splice import is_spliced, mlp_choice, mlp_difference, spliced_mlps


@dataclass(frozen=True)
class FaithfulnessConfig:
    """How notebook 02 measures faithfulness."""

    n_rollouts: int = 200
    """Held-out prompts whose target responses form the text (the paper used 200 rollouts)."""
    max_new_tokens: int = 200
    """Generation budget of the target's responses."""
    batch_size: int = 50
    """Sequences per forward pass."""
    n_bootstrap: int = 1000
    """Bootstrap resamples (of sequences) for the 95% intervals."""
    seed: int = 0
    """Seeds the bootstrap."""
    uncertain_threshold: float = 0.8
    """A token is "uncertain" when the target's top next-token probability is <= this."""
    cache_target: bool = True
    """Keep the target's log-probabilities of every batch (fast; the organism). False: run the target again for
    each compared model (``RecomputedPasses``), what a 7B pair with 4k-token rollouts needs."""
    include_prompt: bool = False
    """False (the paper's measure): score only the positions that predict the target's response tokens and the
    end-of-sequence after them. True: also the prompt's positions (every position whose next token is real)."""

    def __post_init__(self):
        if self.n_rollouts < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("FaithfulnessConfig needs n_rollouts, max_new_tokens and batch_size >= 1")
        if self.n_bootstrap < 10:
            raise ValueError(f"FaithfulnessConfig.n_bootstrap must be >= 10 for an interval, got {self.n_bootstrap}")
        if not 0 < self.uncertain_threshold <= 1:
            raise ValueError(f"uncertain_threshold must be in (0, 1], got {self.uncertain_threshold}")
        if not isinstance(self.include_prompt, bool):
            raise ValueError(f"FaithfulnessConfig.include_prompt must be True or False, got {self.include_prompt!r}")


def onpolicy_batches(target, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                     progress: bool = True, include_prompt: bool = False) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of prompt + the target's greedy response (+ end-of-sequence when it stopped).

    Each batch has ``input_ids``, ``attention_mask`` and ``score_mask``: 1 at the positions whose prediction is
    scored. By default those predicting a response token or the end-of-sequence after it (position t counts when
    token t+1 belongs to the response), so a row scores at most ``max_new_tokens`` (+1 for its end-of-sequence)
    positions; ``include_prompt=True``: every position whose next token is real (``metrics.next_token_mask``)."""
    generation = generate_greedy(target, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, progress=progress, desc="target rollouts")
    sequences, prompt_lengths = [], []
    for prompt, response, length in zip(prompts, generation.responses, generation.response_tokens):
        ids, n_prompt = _prompt_and_response(tokenizer, prompt, response)
        sequences.append(ids + [tokenizer.eos_token_id] if length < max_new_tokens else ids)
        prompt_lengths.append(n_prompt)
    batches = []
    for start in range(0, len(sequences), batch_size):
        batch = pad_batch(tokenizer, sequences[start:start + batch_size])
        batch["score_mask"] = response_positions(batch["attention_mask"], prompt_lengths[start:start + batch_size],
                                                 include_prompt)
        batches.append(batch)
    return batches


def _prompt_and_response(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of prompt + response and the number of prompt tokens. The text is tokenised as a whole (how the
    target read it while generating, token for token, with the tokenisers the project uses); should that merge
    tokens across the boundary, prompt and response are tokenised separately so the boundary stays exact."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    ids = encode_prompt(tokenizer, prompt + response)
    if ids[:len(prompt_ids)] != prompt_ids:
        ids = prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids, len(prompt_ids)


def response_positions(attention_mask: torch.Tensor, prompt_lengths: list[int],
                       include_prompt: bool = False) -> torch.Tensor:
    """The scored positions of right-padded prompt + response rows: t counts when token t+1 is real and, unless
    ``include_prompt``, a response token (t + 1 >= the row's prompt length)."""
    scored = metrics.next_token_mask(attention_mask)
    if not include_prompt:
        columns = torch.arange(attention_mask.shape[-1])
        starts = torch.tensor(prompt_lengths).unsqueeze(-1) - 1
        scored = scored * (columns >= starts).to(scored.dtype)
    return scored


@dataclass
class TargetPass:
    """The target's outputs on one batch, cached so every model is compared without running the target again."""

    log_probs: torch.Tensor
    residuals: list[torch.Tensor]
    real: torch.Tensor
    """True on real tokens (where NMSE and L0 count)."""
    scored: torch.Tensor
    """True on the scored positions (where KL and top-1 count): the batch's ``score_mask``, else every position
    whose next token is real (``metrics.next_token_mask``)."""
    uncertain: torch.Tensor
    """True on scored positions where the target's top probability is <= the threshold."""
    mlp_inputs: dict[int, torch.Tensor] | None = None
    """{layer: the target's MLP input}, kept only when asked (``target_pass(..., mlp_inputs=True)``): the inputs
    at which ``compare`` measures an adapter's FVU the usual transcoder way."""


def _forward(model, batch, mlp_inputs: bool = False):
    with capture_residuals(model) as residuals, capture_features(model) as features, \
            (capture_mlp_inputs(model) if mlp_inputs else nullcontext({})) as inputs:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits, list(residuals), dict(features), dict(inputs)


@torch.no_grad()
def target_pass(target, batch: dict, uncertain_threshold: float = 0.8, mlp_inputs: bool = False) -> TargetPass:
    """The target's outputs on one batch (``target``: a plain model, or a spliced one switched to "target").

    Scored positions: ``batch["score_mask"]`` when present (``onpolicy_batches``), else ``next_token_mask``.
    ``mlp_inputs``: also keep the target's MLP inputs (for the FVU of ``compare(..., adapter_details=True)``)."""
    with mlp_choice(target, "target") if is_spliced(target) else nullcontext():
        logits, residuals, _, inputs = _forward(target, batch, mlp_inputs)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    real = batch["attention_mask"].bool()
    scored = batch.get("score_mask", metrics.next_token_mask(batch["attention_mask"])).bool() & real
    uncertain = scored & (log_probs.max(-1).values.exp() <= uncertain_threshold)
    return TargetPass(log_probs, residuals, real, scored, uncertain, inputs if mlp_inputs else None)


class RecomputedPasses:
    """The target passes of ``batches`` without keeping them: each iteration runs the target again, one batch at
    a time. For real pairs, where cached log-probabilities do not fit anywhere (200 rollouts x 4k tokens x a 152k
    vocabulary in float32 is ~500 GB); costs one extra target forward per batch and compared model."""

    def __init__(self, target, batches: list[dict], uncertain_threshold: float = 0.8):
        self.target, self.batches, self.uncertain_threshold = target, batches, uncertain_threshold

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield target_pass(self.target, batch, self.uncertain_threshold)


def target_passes(target, batches: list[dict], uncertain_threshold: float = 0.8,
                  cache: bool = True) -> list[TargetPass] | RecomputedPasses:
    """Run the target once per batch and keep its outputs (``cache=False``: recompute them whenever they are
    iterated, see ``RecomputedPasses``)."""
    if not cache:
        return RecomputedPasses(target, batches, uncertain_threshold)
    return [target_pass(target, batch, uncertain_threshold) for batch in batches]


@dataclass
class Comparison:
    """Per-sequence sums of one model's disagreement with the target (for bootstrapping), plus layer totals."""

    kl: np.ndarray
    """Per sequence: KL(target || model) summed over its scored positions."""
    top1: np.ndarray
    """Per sequence: scored positions whose argmax differs from the target's."""
    tokens: np.ndarray
    """Per sequence: scored positions."""
    kl_uncertain: np.ndarray
    top1_uncertain: np.ndarray
    tokens_uncertain: np.ndarray
    nmse_by_layer: list[float]
    """Every hidden state (index 0 the embedding output), over every real position."""
    l0: float | None
    """Active features per real token per layer with features; None for a model without adapters."""
    real_tokens: int = 0
    """Real positions of the text (where NMSE and L0 count)."""
    adapter: AdapterDetails | None = None
    """Per-layer feature statistics and FVU, when ``compare`` was asked for them (``adapter_details``)."""


@dataclass
class AdapterDetails:
    """What ``compare(..., adapter_details=True)`` adds for a model with adapters, over every real position."""

    l0_by_layer: list[float]
    """Active features per real token, every layer (0 where a layer has no adapter)."""
    fired: dict[int, torch.Tensor]
    """{layer: bool [n_features]}, True where the feature fired on at least one real token."""
    fired_first_half: dict[int, torch.Tensor]
    """The same on the first half of the batches (how stable the dead share is)."""
    fvu_by_layer: list[float]
    """Adapter output against the MLP difference at the MLP inputs the compared model itself produces."""
    fvu_target_inputs_by_layer: list[float]
    """The same at the target's own MLP inputs (the usual transcoder convention)."""


class _AdapterTally:
    """Running sums behind ``AdapterDetails``, one batch at a time."""

    def __init__(self, model, n_batches: int):
        self.mlps, self.n_batches, self.batches = spliced_mlps(model), n_batches, 0
        self.active = torch.zeros(len(self.mlps))
        self.fired: dict[int, torch.Tensor] = {}
        self.fired_half: dict[int, torch.Tensor] = {}
        self.fvu_own: dict[int, metrics.RunningFVU] = {}
        self.fvu_target: dict[int, metrics.RunningFVU] = {}

    def add(self, features: dict, inputs: dict, reference: TargetPass) -> None:
        if reference.mlp_inputs is None:
            raise ValueError("adapter_details needs the target's MLP inputs: make the passes with "
                             "target_pass(..., mlp_inputs=True)")
        if self.batches == (self.n_batches + 1) // 2:
            self.fired_half = {layer: f.clone() for layer, f in self.fired.items()}
        self.batches += 1
        real = reference.real
        for layer, acts in features.items():
            acts = acts[real]
            self.active[layer] += float(metrics.active_per_token(acts).sum())
            self.fired[layer] = self.fired.get(layer, torch.zeros(acts.shape[-1], dtype=torch.bool)) | (acts > 0).any(0)
            mlp = self.mlps[layer]
            for store, source in ((self.fvu_own, inputs), (self.fvu_target, reference.mlp_inputs)):
                x = source[layer][real]
                store.setdefault(layer, metrics.RunningFVU()).add(mlp.adapter(x).out, mlp_difference(mlp, x))

    def details(self, real_tokens: int) -> AdapterDetails | None:
        if not self.fired:
            return None
        layers = sorted(self.fired)
        return AdapterDetails((self.active / real_tokens).tolist(), self.fired, self.fired_half or self.fired,
                              [self.fvu_own[i].value() for i in layers], [self.fvu_target[i].value() for i in layers])


@torch.no_grad()
def compare(model, batches: list[dict], passes, adapter_details: bool = False) -> Comparison:
    """Compare ``model`` (with whatever MLP choice it has) with the target passes (a list, ``RecomputedPasses`` or
    any iterable yielding one ``TargetPass`` per batch, in order), sequence by sequence: KL and top-1 over each
    pass's scored positions (the token set is the passes': ``score_mask`` or every next-token position), NMSE and
    L0 over its real positions (``tdlib.metrics``). The project's one evaluation loop: notebook 02 on on-policy
    responses, ``evaluate_replacement`` on held-out traces. ``adapter_details``: also ``AdapterDetails`` (the
    passes must keep the target's MLP inputs)."""
    sums = {k: [] for k in ("kl", "top1", "tokens", "kl_uncertain", "top1_uncertain", "tokens_uncertain")}
    nmse_num = nmse_den = 0
    active, feature_tokens, n_layers_with_features, real_tokens = 0.0, 0, 0, 0
    tally = _AdapterTally(model, len(batches)) if adapter_details else None
    for batch, reference in zip(batches, passes):
        logits, residuals, features, inputs = _forward(model, batch, mlp_inputs=adapter_details)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        per_token_kl = metrics.kl_from_log_probs(reference.log_probs, log_probs)
        disagree = metrics.token_top1_disagreement(reference.log_probs, log_probs)
        for suffix, keep in (("", reference.scored), ("_uncertain", reference.uncertain)):
            keep = keep.float()
            sums["kl" + suffix].append((per_token_kl * keep).sum(-1))
            sums["top1" + suffix].append((disagree * keep).sum(-1))
            sums["tokens" + suffix].append(keep.sum(-1))
        errors, norms = metrics.nmse_sums(residuals, reference.residuals, reference.real)
        nmse_num, nmse_den = nmse_num + errors, nmse_den + norms
        real_tokens += int(reference.real.sum())
        if tally is not None and features:
            tally.add(features, inputs, reference)
        if features:
            n_layers_with_features = len(features)
            active += sum(float(metrics.active_per_token(acts[reference.real]).sum()) for acts in features.values())
            feature_tokens += int(reference.real.sum())
    arrays = {k: torch.cat(v).double().numpy() for k, v in sums.items()}
    l0 = active / (feature_tokens * n_layers_with_features) if feature_tokens else None
    return Comparison(**arrays, nmse_by_layer=(nmse_num / nmse_den).tolist(), l0=l0, real_tokens=real_tokens,
                      adapter=tally.details(real_tokens) if tally is not None else None)


HELDOUT_TEXT = "held-out traces of the training distribution (prompt and response, teacher-forced)"
"""What ``evaluate_replacement`` (notebook 01) runs on; notebook 02's text is on-policy (``onpolicy_batches``)."""


def scored_positions_description(include_prompt: bool) -> str:
    """The results files' words for the KL / top-1 token set (``response_positions``)."""
    if include_prompt:
        return "every position whose next token is real (prompt and response)"
    return "positions predicting a response token or the end-of-sequence after it"


@torch.no_grad()
def evaluate_replacement(model, batches: list[dict], choice: str = "adapter") -> dict:
    """Held-out metrics of the spliced ``model`` run with MLP ``choice`` against the same model run as the target
    (``compare`` with target passes made batch by batch from ``model`` itself), on ``HELDOUT_TEXT``:

    * ``kl``, ``top1_error``: over the KL token set of ``batches`` (their ``score_mask``, else
      ``next_token_mask``: every position whose next token is real); ``n_tokens`` is the number of those positions;
    * ``nmse_by_layer`` (index 0 the embedding output), ``nmse_layers`` (headline, embedding excluded),
      ``nmse_with_embedding``: over every real position (``n_real_tokens``);
    * adapters only: ``l0_by_layer``/``l0`` (every real position), ``dead_fraction_heldout`` (never fired on these
      tokens) and ``dead_fraction_heldout_half`` (the same on the first half of the batches: close to the full
      value when the held-out set is large enough for the share to be stable), ``fvu_by_layer`` (adapter output
      against the MLP difference at the adapter's placement, ``tdlib.splice.mlp_difference``:
      target_mlp(x) - base_mlp(x), both passed through the block's post-MLP norm under "residual", at the MLP
      inputs x the replacement model itself produces) and ``fvu_target_inputs_by_layer`` (the same at the target's
      own MLP inputs, the usual transcoder convention).
    """
    details = choice == "adapter"
    passes = (target_pass(model, batch, mlp_inputs=details) for batch in batches)
    with mlp_choice(model, choice):
        c = compare(model, batches, passes, adapter_details=details)
    n_scored = c.tokens.sum()
    result = {
        "kl": float(c.kl.sum() / n_scored),
        "top1_error": float(c.top1.sum() / n_scored),
        "nmse_by_layer": c.nmse_by_layer,
        "nmse_layers": metrics.nmse_layers(c.nmse_by_layer),
        "nmse_with_embedding": metrics.nmse_with_embedding(c.nmse_by_layer),
        "n_tokens": int(n_scored),
        "n_real_tokens": c.real_tokens,
    }
    if c.adapter is not None:
        result["l0_by_layer"] = c.adapter.l0_by_layer
        result["l0"] = sum(c.adapter.l0_by_layer) / len(c.adapter.l0_by_layer)
        result["dead_fraction_heldout"] = metrics.dead_fraction_heldout(c.adapter.fired)
        result["dead_fraction_heldout_half"] = metrics.dead_fraction_heldout(c.adapter.fired_first_half)
        result["fvu_by_layer"] = c.adapter.fvu_by_layer
        result["fvu_target_inputs_by_layer"] = c.adapter.fvu_target_inputs_by_layer
    return result


def bootstrap_ratio(numerators: np.ndarray, denominators: np.ndarray, n_bootstrap: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of sum(numerators) / sum(denominators) when whole sequences are resampled."""
    numerators, denominators = np.asarray(numerators, float), np.asarray(denominators, float)
    if denominators.sum() == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(numerators), size=(n_bootstrap, len(numerators)))
    totals = denominators[index].sum(1)
    ratios = numerators[index].sum(1) / np.where(totals > 0, totals, np.nan)
    low, high = np.nanpercentile(ratios, [2.5, 97.5])
    return (float(low), float(high))


def summarize(comparison: Comparison, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """The results-contract entry of one model: KL and top-1 as means over the scored positions (``n_tokens`` of
    them) with sequence-bootstrap intervals; ``nmse_layers`` (headline, embedding entry excluded),
    ``nmse_with_embedding`` and ``nmse_by_layer`` over every real position."""
    c = comparison

    def ratio(num, den):
        total = den.sum()
        return float(num.sum() / total) if total else float("nan")

    return {
        "l0": c.l0,
        "kl": ratio(c.kl, c.tokens),
        "kl_ci": list(bootstrap_ratio(c.kl, c.tokens, n_bootstrap, seed)),
        "top1_error": ratio(c.top1, c.tokens),
        "top1_error_ci": list(bootstrap_ratio(c.top1, c.tokens, n_bootstrap, seed)),
        "nmse_by_layer": c.nmse_by_layer,
        "nmse_layers": metrics.nmse_layers(c.nmse_by_layer),
        "nmse_with_embedding": metrics.nmse_with_embedding(c.nmse_by_layer),
        "kl_uncertain": ratio(c.kl_uncertain, c.tokens_uncertain),
        "kl_uncertain_ci": list(bootstrap_ratio(c.kl_uncertain, c.tokens_uncertain, n_bootstrap, seed)),
        "top1_error_uncertain": ratio(c.top1_uncertain, c.tokens_uncertain),
        "top1_error_uncertain_ci": list(bootstrap_ratio(c.top1_uncertain, c.tokens_uncertain, n_bootstrap, seed)),
        "n_tokens": int(c.tokens.sum()),
        "n_uncertain_tokens": int(c.tokens_uncertain.sum()),
        "n_sequences": len(c.tokens),
    }


SUBSET_PLANS = ("paper", "all")
"""``layer_subsets`` plans. ``"paper"``: each single layer, the first k and the last k layers for a few k, and all
layers (the paper's Fig. 3 families: L + 2 len(ks) + 1 subsets, 39 at 30 layers). ``"all"``: also the two halves
and every contiguous block (up to ``max_blocks_layers`` layers; beyond that every first-k and last-k), 87 subsets
at 30 layers."""


def default_subset_ks(n_layers: int) -> list[int]:
    """The first-k / last-k sizes of the ``"paper"`` plan: powers of two below ``n_layers`` from 2 (2, 4, 8, 16)."""
    return [2 ** i for i in range(1, max(1, n_layers).bit_length()) if 2 ** i < n_layers]


def layer_subsets(n_layers: int, plan: str = "paper", ks: list[int] | None = None,
                  max_blocks_layers: int = 8) -> dict[str, list[int]]:
    """Named subsets of layers that use the adapter (the rest run the target's MLP), in ``plan`` (``SUBSET_PLANS``):
    ``"paper"`` names them ``layer i``, ``first k``, ``last k`` and ``all`` (``ks``: None = ``default_subset_ks``);
    ``"all"`` is every single layer, the halves, contiguous blocks (``layers i-j``) and all. Subsets with the same
    layers keep their first name."""
    if plan not in SUBSET_PLANS:
        raise ValueError(f"subset plan {plan!r} is not one of {SUBSET_PLANS}: 'paper' (single layers, first k, last "
                         "k) or 'all' (every contiguous block up to 8 layers)")
    candidates: list[tuple[str, list[int]]] = [(f"layer {i}", [i]) for i in range(n_layers)]
    candidates += _paper_families(n_layers, ks) if plan == "paper" else _all_blocks(n_layers, max_blocks_layers)
    candidates.append(("all", list(range(n_layers))))
    subsets, seen = {}, set()
    for name, layers in candidates:
        if layers and tuple(layers) not in seen:
            seen.add(tuple(layers))
            subsets[name] = layers
    return subsets


def _paper_families(n_layers: int, ks: list[int] | None) -> list[tuple[str, list[int]]]:
    ks = default_subset_ks(n_layers) if ks is None else list(ks)
    if any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"subset sizes must be whole numbers of layers >= 1, got {ks}")
    ks = sorted(k for k in set(ks) if k < n_layers)  # k >= n_layers is "all"
    return [(f"first {k}", list(range(k))) for k in ks] + [(f"last {k}", list(range(n_layers - k, n_layers)))
                                                            for k in ks]


def _all_blocks(n_layers: int, max_blocks_layers: int) -> list[tuple[str, list[int]]]:
    half = n_layers // 2
    candidates = [("first half", list(range(half))), ("second half", list(range(half, n_layers)))]
    if n_layers <= max_blocks_layers:
        blocks = [(i, i + length) for length in range(2, n_layers) for i in range(n_layers - length + 1)]
    else:
        blocks = [(0, k) for k in range(2, n_layers)] + [(n_layers - k, n_layers) for k in range(2, n_layers)]
    return candidates + [(f"layers {i}-{j - 1}", list(range(i, j))) for i, j in blocks]


@torch.no_grad()
def subset_kl(model, batches: list[dict], passes: list[TargetPass], subsets: dict[str, list[int]],
              progress: bool = True) -> dict[str, float]:
    """KL(target || model) when only the layers of each subset use their adapter (the rest the target's MLP)."""
    results = {}
    for name, layers in tqdm(subsets.items(), desc="layer subsets", disable=not progress, leave=False):
        with mlp_choice(model, {layer: "adapter" for layer in layers}):
            comparison = compare(model, batches, passes)
        results[name] = float(comparison.kl.sum() / comparison.tokens.sum())
    return results


def subset_finding(kl_by_subset: dict[str, float]) -> dict:
    """Whether every proper subset stays below the all-layers KL (the paper's "errors don't accumulate")."""
    all_layers = kl_by_subset["all"]
    partial = {k: v for k, v in kl_by_subset.items() if k != "all"}
    worst = max(partial, key=partial.get) if partial else None
    return {
        "all_layers_kl": all_layers,
        "every_subset_below_all": all(v < all_layers for v in partial.values()),
        "worst_subset": worst,
        "worst_subset_kl": partial.get(worst),
        "subsets_at_or_above_all": sorted(k for k, v in partial.items() if v >= all_layers),
    }


def model_names(train_results: dict) -> list[str]:
    """The models notebook 02 compares: base, hybrid and every trained model listed by notebook 01."""
    names = ["base", "hybrid"]
    names += [n for n in train_results["models"] if n not in names and n != "target"]
    return names


def evaluate_faithfulness(pair, names: list[str], batches: list[dict], config: FaithfulnessConfig,
                          passes: list[TargetPass] | None = None, progress: bool = True) -> dict[str, dict]:
    """{name: summary} for each model, comparing with one cached target pass per batch (``passes``, computed here
    when not given)."""
    if passes is None:
        passes = target_passes(load_named(pair, "target"), batches, config.uncertain_threshold, config.cache_target)
    results = {}
    for name in tqdm(names, desc="models", disable=not progress):
        model = load_named(pair, name)
        results[name] = summarize(compare(model, batches, passes), config.n_bootstrap, config.seed)
        del model
    return results


def faithfulness_results(models: dict, subset_kl: dict, finding: dict, subset_model: str, subset_plan: dict,
                         evalset, n_sequences: int, n_tokens: int, n_uncertain: int,
                         settings: FaithfulnessConfig) -> dict:
    """``02_faithfulness.json`` (without ``config``): each model's on-policy output and internal faithfulness, the
    layer-subset KLs of ``subset_model`` with their finding, and the text they were measured on.
    ``subset_plan``: ``{"plan": ..., "subsets": ...}``."""
    return {
        "models": models,
        "subset_kl": subset_kl,
        "all_layers_kl": finding["all_layers_kl"],
        "subset_model": subset_model,
        "subset_plan": subset_plan,
        "subset_finding": finding,
        "text": f"held-out prompts ({evalset.source}) + the target's greedy responses (on-policy)",
        "benchmark": evalset.benchmark,
        "n_sequences": n_sequences, "n_tokens": n_tokens, "n_uncertain_tokens": n_uncertain,
        "scored_positions": scored_positions_description(settings.include_prompt),
        "include_prompt": settings.include_prompt,
        "settings": asdict(settings),
        "interval": "95% percentile bootstrap over sequences",
    }
