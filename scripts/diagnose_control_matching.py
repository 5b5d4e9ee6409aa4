"""Why a matched random control fires less at the decision points than the selected set: per layer of notebook 06's
selection, how many unchosen features fire at the decision points and at what rates (``tdlib.decisions``), on the
selection side of the split that notebook 06 draws its controls from. Writes results/diagnostics/<config>_control_matching.json.

    python scripts/diagnose_control_matching.py --config organism
"""
from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    from tdlib import decisions as D
    from tdlib.models import load_tokenizer
    from tdlib.pairs import resolve_pair
    from tdlib.results import COMMITTED_OUTPUTS, atomic_write_text, read_results, resolve
    from tdlib.runs import load_named

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="organism")
    args = parser.parse_args(argv)
    pair = resolve_pair(args.config)
    results_dir = COMMITTED_OUTPUTS.get(args.config, COMMITTED_OUTPUTS["organism"])[0]
    ablation = read_results("06_ablation", results_dir, config=pair.name)
    study = ablation["decision_study"]
    if study is None:
        raise ValueError(f"06_ablation.json of {args.config!r} has no decision study; run notebook 06 first")
    plan = study["preregistered"]
    tokenizer = load_tokenizer(pair.target)
    model = load_named(pair, ablation["adapter_model"])
    entries = read_results("05_attribution", results_dir, config=pair.name)["features"]
    key = D.decision_key(pair)
    sides = D.held_out_references(pair, tokenizer, plan["n_selection_problems"])
    traces = D.decision_traces(key, tokenizer, sides["selection"][:plan["n_selection_traces"]])
    rate = D.decision_activations(model, tokenizer, traces, plan["batch_size"])["fire_rate"]
    result = {"config": pair.name, "adapter": ablation["adapter_model"], "traces": traces.counts(),
              "per_layer": D.matching_report(D.feature_groups(entries)["set"], rate)}
    out = resolve("results") / "diagnostics" / f"{args.config}_control_matching.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["per_layer"], indent=1))
    print(out)


if __name__ == "__main__":
    main()
