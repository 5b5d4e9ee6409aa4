"""Seconds per attribution graph (``tdlib.attribution.attribute``) in each base-MLP mode (frozen, relp, target,
jacobian),
broken down by phase, beside a plain forward.

    python scripts/bench_attribution.py --config smoke                      # a built pair and its trained adapters
    python scripts/bench_attribution.py --shape organism --threads 1        # the organism's shape, random weights
    python scripts/bench_attribution.py --config smollm2 --max-feature-nodes 512 --batch-size 64 --threads 1

Phases of one graph (each timed inside ``attribute`` by wrapping the functions it calls, nothing else changed):

* forward: ``freeze``, the adapter model's forward pass on the prompt with every norm scale, attention pattern,
  error node and active feature captured;
* selection: ``select_features_by_influence`` (only with ``--max-feature-nodes`` and more features active), its
  own backward batches included;
* backward batches: the graph's transposed passes of the frozen replay, ``--batch-size`` target nodes per batch
  (none for a capped graph: it is assembled from the rows selection computed);
* other: the rest of ``attribute`` (adjacency assembly, biases, logits);
* pruning: ``prune`` (node then edge thresholds); scores: ``graph_scores``.

The plain reference is one ``torch.no_grad`` forward of the same adapter model on the same prompt. Each graph is
timed ``--repeats`` times after a warm-up, alternating with the reference; medians are reported, and each mode's
total beside the ``frozen`` one (relp, target and jacobian pass every backward batch through the linearised base
MLPs).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from bench_common import SHAPES, Timer, pair_or_exit, random_model, set_threads


def random_adapter_model(shape: str, n_features: int, l0: float, ids: torch.Tensor):
    """A spliced random model of ``shape`` whose adapters have about ``l0`` active features per token per layer on
    ``ids`` (each layer's encoder bias is shifted to the matching quantile of its pre-activations)."""
    from tdlib.adapter import AdapterSet
    from tdlib.splice import set_mlp_choice, splice, spliced_mlps

    base, target = random_model(shape, 0), random_model(shape, 1)
    adapters = AdapterSet.for_model(target, n_features)
    generator = torch.Generator().manual_seed(0)
    for adapter in adapters.adapters.values():
        torch.nn.init.normal_(adapter.W_dec, std=0.05, generator=generator)
    model = splice(target, base, adapters)
    set_mlp_choice(model, "adapter")
    inputs = {}
    handles = [mlp.adapter.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
               for i, mlp in enumerate(spliced_mlps(model))]
    with torch.no_grad():
        for i, mlp in enumerate(spliced_mlps(model)):  # layer by layer: a shift changes the inputs above it
            model(input_ids=ids[None])
            pre = inputs[i] @ mlp.adapter.W_enc.T + mlp.adapter.b_enc
            mlp.adapter.b_enc -= torch.quantile(pre.flatten()[:2 ** 24], 1 - l0 / n_features)
    for handle in handles:
        handle.remove()
    return model.eval()


def pair_adapter_model(config: str, run: str | None, prompt_tokens: int | None):
    """(adapter model, prompt ids, run name) of a built pair: 01's analysis model (else the first adapter run) and
    the first prompt of the pair's benchmark."""
    from tdlib.problems import pair_benchmark
    from tdlib.models import load_tokenizer
    from tdlib.results import read_results
    from tdlib.runs import load_named, trained_runs

    pair = pair_or_exit(config)
    if run is None:
        try:
            train = read_results("01_train")
            run = train["analysis_model"] if train.get("config") == pair.name else None
        except FileNotFoundError:
            pass
        run = run or next((n for n, r in trained_runs(pair).items() if r["kind"] == "adapter"), None)
    if run is None:
        raise SystemExit(f"no trained adapter run for {pair.name!r}; run notebooks/01_train.ipynb first, or time "
                         "random weights with --shape")
    tokenizer = load_tokenizer(pair.target)
    prompt = pair_benchmark(pair, limit=1).prompts(tokenizer)[0]
    ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    return load_named(pair, run), ids[:prompt_tokens] if prompt_tokens else ids, f"{pair.name} pair, run {run}"


@contextmanager
def phase_timers(seconds: dict, calls: dict):
    """Wrap the functions ``attribute`` calls so each adds its wall time to ``seconds[phase]``."""
    import sys

    import tdlib.attribution  # noqa: F401 (the package names its function attribute, so the module is read
    module = sys.modules["tdlib.attribution.attribute"]  # from sys.modules)

    names = {"freeze": "forward", "select_features_by_influence": "selection", "_transpose_rows": "backward batches",
             "_fill_rows": "backward batches"}
    originals = {name: getattr(module, name) for name in names}

    active = []  # a call inside a timed call (selection runs backward batches itself) counts to the outer one

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            if active:
                return fn(*args, **kwargs)
            active.append(name)
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[names[name]] += time.perf_counter() - started
                calls[names[name]] += 1
                active.pop()
        return wrapper

    for name, fn in originals.items():
        setattr(module, name, timed(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def one_graph(model, ids, token: int, args, mode: str) -> dict:
    from tdlib.attribution import attribute, graph_scores, prune

    seconds, calls = defaultdict(float), defaultdict(int)
    started = time.perf_counter()
    with phase_timers(seconds, calls):
        graph = attribute(model, ids, token, batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes,
                          mode=mode)
    seconds["attribute"] = time.perf_counter() - started
    seconds["other"] = seconds["attribute"] - sum(seconds[p] for p in ("forward", "selection", "backward batches"))
    started = time.perf_counter()
    prune(graph, 0.8, 0.98)
    seconds["pruning"] = time.perf_counter() - started
    started = time.perf_counter()
    graph_scores(graph)
    seconds["scores"] = time.perf_counter() - started
    seconds["total"] = seconds["attribute"] + seconds["pruning"] + seconds["scores"]
    return {"seconds": dict(seconds), "batches": calls["backward batches"], "n_active": graph.n_active_features,
            "n_nodes": graph.adjacency.shape[0]}


PHASES = ("forward", "selection", "backward batches", "other", "pruning", "scores", "total")


def main(argv: list[str] | None = None) -> dict:
    from tdlib.splice import set_mlp_choice

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="organism", help="a built pair with a trained adapter run")
    parser.add_argument("--run", default=None, help="adapter run of the pair (default: 01's analysis model)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of a pair")
    parser.add_argument("--n-features", type=int, default=512, help="with --shape: adapter features per layer")
    parser.add_argument("--l0", type=float, default=8.0, help="with --shape: active features per token per layer")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="prompt length (with --shape: default 64; a pair: its first prompt, cut to this)")
    parser.add_argument("--batch-size", type=int, default=128, help="target nodes per backward batch")
    parser.add_argument("--max-feature-nodes", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--modes", nargs="+", default=None,
                        help="base-MLP modes to time (default: every mode of tdlib.attribution.MODES)")
    args = parser.parse_args(argv)
    if args.modes is None:
        from tdlib.attribution import MODES

        args.modes = list(MODES)
    threads = set_threads(args.threads)

    if args.shape:
        vocab = SHAPES[args.shape][1]["vocab_size"]
        ids = torch.randint(0, vocab, (args.prompt_tokens or 64,), generator=torch.Generator().manual_seed(0))
        model = random_adapter_model(args.shape, args.n_features, args.l0, ids)
        what = f"{args.shape} shape, random weights, about {args.l0:g} active features per token per layer"
    else:
        model, ids, what = pair_adapter_model(args.config, args.run, args.prompt_tokens)
        set_mlp_choice(model, "adapter")
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad():
        token = int(model(input_ids=ids[None]).logits[0, -1].argmax())

    def forward():
        with torch.no_grad():
            model(input_ids=ids[None])

    timer, results = Timer(), {}
    forward()
    for mode in args.modes:
        graphs = []
        one_graph(model, ids, token, args, mode)  # warm-up
        for _ in range(args.repeats):
            graphs.append(one_graph(model, ids, token, args, mode))
            timer.run("forward", forward)
        results[mode] = {"seconds": {phase: statistics.median(g["seconds"].get(phase, 0.0) for g in graphs)
                                     for phase in PHASES},
                         "batches": graphs[0]["batches"], "n_active": graphs[0]["n_active"],
                         "n_nodes": graphs[0]["n_nodes"]}
    plain = timer.median("forward")
    first = results[args.modes[0]]
    print(f"{what}; prompt {int(ids.shape[0])} tokens, {first['n_active']} active features, "
          f"batches of <= {args.batch_size}, max_feature_nodes {args.max_feature_nodes}, torch threads {threads}, "
          f"median of {args.repeats}")
    print("  " + " " * 17 + "".join(f"{mode:>12s}" for mode in args.modes))
    for phase in PHASES:
        print(f"  {phase:17s}" + "".join(f"{results[m]['seconds'][phase]:10.3f} s" for m in args.modes))
    reference = results.get("frozen", first)["seconds"]["total"]
    print("  vs frozen        " + "".join(f"{results[m]['seconds']['total'] / reference:11.2f}x" for m in args.modes))
    print(f"  plain forward of the adapter model on the prompt: {plain * 1e3:.1f} ms; a graph costs "
          + ", ".join(f"{m} {results[m]['seconds']['total'] / plain:.0f}" for m in args.modes) + " of them")
    result = {"what": what, "threads": threads, "prompt_tokens": int(ids.shape[0]), "plain_forward": plain,
              "modes": results}
    return result


if __name__ == "__main__":
    main()
