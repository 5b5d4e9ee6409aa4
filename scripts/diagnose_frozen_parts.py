"""Which frozen part stops a first-order attribution from predicting feature removals?

On hesitation prompts cut from the pair's reference traces, each graph's top features (mode ``jacobian``) are
removed one at a time in the real adapter model, and the change of the hesitation logit is compared (Spearman's
rank correlation within each prompt, averaged) with four gradient x activation predictions through the real
model's own modules: nothing frozen, only the norm denominators frozen, only the attention patterns frozen, both
(which is what mode ``jacobian`` computes, so its graph is scored beside them).

    python scripts/diagnose_frozen_parts.py --config organism --n-prompts 8
    python scripts/diagnose_frozen_parts.py --config smollm2 --n-prompts 4

Writes ``results/diagnostics/<config>_frozen_parts.json`` (atomically). Families whose norms are RMSNorm modules
with ``variance_epsilon`` or ``eps`` (Qwen2, Llama, Gemma) are supported.
"""
from __future__ import annotations

import argparse
import json
from contextlib import ExitStack
from unittest import mock

import torch

VARIANTS = {"nothing frozen": (False, False), "norms frozen": (True, False), "attention frozen": (False, True),
            "both frozen": (True, True)}


def _frozen_norm(norm):
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    original = norm.forward

    def forward(x):
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).detach()
        reference = original(x)  # the module's own output, rescaled by a frozen denominator
        live = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        return (reference.float() * (scale / live)).to(reference.dtype)
    return forward


def gradient_predictions(model, ids, token: int, freeze_norms: bool, freeze_attention: bool) -> dict:
    """{(layer, position, feature): -gradient x activation} of the demeaned ``token`` logit: the gradient rule
    (``tdlib.attribution.gradient_evidence``) run with the chosen parts frozen."""
    from tdlib.attribution import HesitationPrompt, gradient_evidence

    with ExitStack() as stack:
        if freeze_attention:
            softmax = torch.nn.functional.softmax
            stack.enter_context(mock.patch.object(torch.nn.functional, "softmax",
                                                  lambda *a, **k: softmax(*a, **k).detach()))
        if freeze_norms:
            for norm in [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]:
                stack.enter_context(mock.patch.object(norm, "forward", _frozen_norm(norm)))
        found = gradient_evidence(model, [HesitationPrompt(list(ids), 0, 0)], token, progress=False)
    return found.node_predictions[0]


def main(argv: list[str] | None = None) -> dict:
    from tdlib import attribution as A
    from tdlib.models import load_tokenizer
    from tdlib.pair_data import reference_responses
    from tdlib.pairs import resolve_pair
    from tdlib.results import COMMITTED_OUTPUTS, atomic_write_text, resolve
    from tdlib.sweep import load_studied

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="organism")
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--n-features", type=int, default=20, help="top features of each graph removed")
    parser.add_argument("--max-feature-nodes", type=int, default=None)
    args = parser.parse_args(argv)

    pair = resolve_pair(args.config)
    results_dir = COMMITTED_OUTPUTS.get(args.config, COMMITTED_OUTPUTS["organism"])[0]
    _, model = load_studied(pair, results_dir)
    model.set_attn_implementation("eager")  # the softmax the patch detaches
    tokenizer = load_tokenizer(pair.target)
    token = A.hesitation_token(tokenizer, pair.hesitation_word)
    prompts = A.trace_prompts(tokenizer, reference_responses(pair, tokenizer), args.n_prompts, 1,
                              word=pair.hesitation_word)
    prefix = A.shared_prefix_length(prompts) if len(prompts) > 1 else 1
    scores: dict[str, list[float]] = {"jacobian graph": [], **{v: [] for v in VARIANTS}}
    n_removals = 0
    for prompt in prompts:
        graph = A.attribute(model, prompt.input_ids, token, mode="jacobian",
                            max_feature_nodes=args.max_feature_nodes)
        records = A.intervention_records(model, graph, args.n_features, min_position=prefix, small_fraction=None)
        actual = [r["actual"] for r in records]
        n_removals += len(records)
        scores["jacobian graph"].append(A.rank_correlation([r["predicted_total"] for r in records], actual))
        for variant, flags in VARIANTS.items():
            predicted = gradient_predictions(model, prompt.input_ids, token, *flags)
            keys = [(r["layer"], r["position"], r["feature"]) for r in records]
            scores[variant].append(A.rank_correlation([predicted.get(k, 0.0) for k in keys], actual))
    summary = {k: sum(v) / len(v) for k, v in scores.items()}
    result = {"config": pair.name, "adapter": name, "n_prompts": len(prompts), "n_removals": n_removals,
              "features_per_prompt": args.n_features, "prompt_source": "reference traces",
              "within_prompt_rank_correlation": summary, "per_prompt": scores}
    out = resolve("results") / "diagnostics" / f"{args.config}_frozen_parts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    for variant, value in summary.items():
        print(f"{variant:>18s}: {value:+.3f}")
    print(out)
    return result


if __name__ == "__main__":
    main()
