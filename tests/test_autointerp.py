"""Autointerp on the smoke pair: segment labels, the streaming cache, the offline back end, scoring,
classification, the feature page (and, marked slow, the headless-browser check and notebook 04)."""
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from tdlib.autointerp import (CacheConfig, OfflineBackend, ScoringConfig, build_cache, classify_units,
                              ground_truth_check, logit_effects, score_units, stream_batches, summarize_detection,
                              write_feature_page)
from tdlib.autointerp.backends import Context, DetectJob, ExplainJob, classify_by_segments, parse_patterns
from tdlib.autointerp.cache import ActivationCache, BatchView, UnitStats
from tdlib.autointerp.scoring import balanced_accuracy
from tdlib.autointerp.segments import SEGMENTS
from tdlib.models import anatomy, load_tokenizer
from tdlib.organism import task
from tdlib.organism.segments import token_segments
from tdlib.pair_data import data_for
from tdlib.pairs import resolve_pair
from tdlib.residual import capture_features
from tdlib.splice import mlp_choice
from tdlib.runs import load_named

REPO = Path(__file__).resolve().parents[1]
RUN = "adapter_l1_0.001"
CONFIG = CacheConfig(n_batches=3, batch_size=8, top_k=6, n_uniform=4, n_negative=6, before=5, after=2)


@pytest.fixture(scope="module")
def smoke():
    pair = resolve_pair("smoke")
    return pair, load_named(pair, RUN), load_tokenizer(pair.target)


@pytest.fixture(scope="module")
def cache(smoke):
    pair, model, tokenizer = smoke
    data = data_for(pair, tokenizer, "validation", batch_size=CONFIG.batch_size, seed=CONFIG.seed)
    return build_cache(model, tokenizer, stream_batches(data, CONFIG.n_batches), CONFIG, progress=False)


@pytest.fixture(scope="module")
def scored(cache):
    backend = OfflineBackend()
    return classify_units(score_units(cache, backend, ScoringConfig(units_per_layer=6, n_explain=3, n_test=3, min_fires=2)),
                          cache, backend)


def test_token_segments_follow_the_trace_structure(smoke):
    _, _, tokenizer = smoke
    problem = task.Problem((2, 6, 9), ("-", "+"))
    ids, segments = token_segments(tokenizer, problem)
    assert ids[:-1] == tokenizer(problem.prompt + task.reasoning_trace(problem))["input_ids"]
    text = {name: "".join(tokenizer.decode([i]) for i, s in zip(ids, segments) if SEGMENTS[s] == name)
            for name in SEGMENTS}
    assert text["prompt"] == "Q: 2-6+9=?"
    assert text["check"] == " wait, check: -4+6=2, ok;"
    assert text["step"] == " Work: 2-6= -4; -4+9=5;"
    assert text["answer"] == " A: 5."
    assert segments[-1] == SEGMENTS.index("eos") and ids[-1] == tokenizer.eos_token_id


def _brute_force_windows(acts_rows, before, after):
    """Flattened view of a batch of (lengths) rows for BatchView."""
    lengths = [len(r) for r in acts_rows]
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = torch.arange(len(lengths) * width).view(len(lengths), width) % 50
    return BatchView.from_batch(ids, mask, None, before, after)


def test_streaming_selections_match_a_single_pass_and_stay_bounded():
    torch.manual_seed(0)
    config = CacheConfig(n_batches=1, top_k=5, n_uniform=3, n_negative=4, before=2, after=1)
    all_acts, stats = [], UnitStats(7, config, torch.Generator().manual_seed(0))
    shapes = set()
    for _ in range(6):
        view = _brute_force_windows([[0] * random.randint(3, 9) for _ in range(3)], config.before, config.after)
        acts = torch.relu(torch.randn(len(view.tokens), 7) - 0.5)
        stats.update(acts, view)
        all_acts.append(acts)
        shapes.add(tuple(stats.selections["top"].tokens.shape))
    everything = torch.cat(all_acts)
    assert shapes == {(7, 5, 4)}  # memory does not grow with the number of tokens
    expected = everything.topk(5, dim=0).values.T
    expected = expected.masked_fill(expected <= 0, -math.inf)
    assert torch.allclose(stats.selections["top"].key, expected)
    top = stats.selections["top"]
    assert torch.allclose(top.acts[:, :, config.before][torch.isfinite(top.key)], top.key[torch.isfinite(top.key)])
    assert torch.equal(stats.fires, (everything > 0).sum(0))
    uniform, negative = stats.selections["uniform"], stats.selections["negative"]
    assert (uniform.acts[:, :, config.before][torch.isfinite(uniform.key)] > 0).all()
    assert (negative.acts[:, :, config.before][torch.isfinite(negative.key)] == 0).all()
    assert torch.equal(uniform.counts, (everything > 0).sum(0).clamp(max=3))


@torch.no_grad()
def test_cache_matches_a_direct_forward_pass(smoke, cache):
    pair, model, tokenizer = smoke
    feature_max, neuron_max = {}, {}
    target = load_named(pair, "target")
    captured = {}
    hooks = [anatomy(target).mlp(i).down_proj.register_forward_pre_hook(
        lambda m, args, i=i: captured.__setitem__(i, args[0])) for i in range(anatomy(target).n_layers)]
    try:
        for batch, _ in stream_batches(data_for(pair, tokenizer, "validation", CONFIG.batch_size, CONFIG.seed),
                                       CONFIG.n_batches):
            keep = batch["attention_mask"].bool()
            with mlp_choice(model, "adapter"), capture_features(model) as features:
                model(**batch)
            target(**batch)
            for maxima, captures in ((feature_max, features), (neuron_max, captured)):
                for layer, acts in captures.items():
                    batch_max = acts[keep].max(0).values
                    maxima[layer] = torch.maximum(maxima.get(layer, batch_max), batch_max)
    finally:
        for hook in hooks:
            hook.remove()
    for kind, maxima in (("adapter", feature_max), ("neuron", neuron_max)):
        for layer, expected in maxima.items():
            key = cache.records[(kind, layer)].selections["top"].key[:, 0]
            alive = expected > 0
            assert torch.allclose(key[alive], expected[alive], atol=1e-5), (kind, layer)
            assert torch.isinf(key[~alive]).all()
    batches = stream_batches(data_for(pair, tokenizer, "validation", CONFIG.batch_size, CONFIG.seed), CONFIG.n_batches)
    assert cache.n_tokens == int(sum(b["attention_mask"].sum() for b, _ in batches))
    assert int(cache.seg_tokens.sum()) == cache.n_tokens


def test_cache_round_trips_through_disk(cache, tmp_path):
    directory = cache.save(tmp_path / "cache")
    assert {p.name for p in directory.iterdir()} == {"cache.safetensors", "units.parquet", "cache.json"}
    loaded = ActivationCache.load(directory)
    assert loaded.units == cache.units and loaded.n_tokens == cache.n_tokens
    assert loaded.examples("neuron", 1, 3, "top") == cache.examples("neuron", 1, 3, "top")
    import pandas as pd

    table = pd.read_parquet(directory / "units.parquet")
    assert len(table) == sum(r.fires.shape[0] for r in cache.records.values())
    assert {"kind", "layer", "unit", "frequency", "mass_check", "n_top"} <= set(table.columns)
    with pytest.raises(FileNotFoundError, match="build_cache"):
        ActivationCache.load(tmp_path / "missing")


def _ctx(text_tokens, center=None, acts=None):
    return Context(list(text_tokens), len(text_tokens) - 1 if center is None else center, acts)


def test_offline_backend_finds_the_separating_ngram_and_applies_it():
    # the unit fires on "-" right after "=" (a negative result), never on "-" after a digit
    positives = [_ctx(["3", "=", "-"], acts=[0, 0, 1.0]), _ctx(["9", "=", "-"], acts=[0, 0, 2.0])]
    negatives = [_ctx(["3", "-"]), _ctx(["5", "-"]), _ctx(["+", "4"])]
    backend = OfflineBackend()
    explanation, = backend.explain([ExplainJob("u", positives, negatives)])
    assert parse_patterns(explanation) == [("=", "-")]
    contexts = [_ctx(["1", "=", "-"]), _ctx(["7", "-"]), _ctx(["=", "-", "5"], center=1), _ctx(["=", "-", "5"])]
    predictions, = backend.detect([DetectJob("u", explanation, contexts)])
    assert predictions == [True, False, True, False]
    assert backend.detect([DetectJob("u", "free text from an LLM", contexts)]) == [None]


def test_balanced_accuracy():
    assert balanced_accuracy([True] * 4, [True, True, False, False]) == 0.5
    assert balanced_accuracy([True, False, False, False], [True, True, False, False]) == 0.75
    assert math.isnan(balanced_accuracy([True], [True]))


def test_segment_rule():
    shares = {"prompt": 0.1, "step": 0.3, "check": 0.5, "answer": 0.1, "eos": 0.0}
    assert classify_by_segments(shares, 0.9, 0.6) == "reasoning"
    assert classify_by_segments({**shares, "step": 0.6, "check": 0.2}, 0.9, 0.6) == "domain"
    assert classify_by_segments({**shares, "prompt": 0.7, "check": 0.1}, 0.9, 0.6) == "language"
    assert classify_by_segments(shares, 0.55, 0.6) == "uninterpretable"
    assert classify_by_segments(shares, math.nan, 0.6) == "uninterpretable"
    with pytest.raises(ValueError, match="segment labels"):
        classify_by_segments(None, 0.9, 0.6)
    from tdlib.autointerp.backends import ClassifyJob

    jobs = [ClassifyJob("u", "x", [], 0.9, shares), ClassifyJob("v", "x", [], 0.9, None)]  # v: not an organism unit
    assert OfflineBackend().classify(jobs) == ["reasoning", None]


def test_scoring_and_classification_on_smoke(cache, scored):
    assert set(scored["kind"]) == {"adapter", "neuron"}
    assert scored.groupby("kind")["layer"].nunique().to_dict() == {"adapter": 2, "neuron": 2}
    for regime in ("detection_top", "detection_uniform"):
        assert scored[regime].between(0, 1).all()
    summary = summarize_detection(scored)
    assert summary["adapter"]["n_scored"] == len(scored[scored["kind"] == "adapter"])
    assert summary["adapter"]["detection_top"] > 0.5  # explanations from max-activating contexts beat chance
    assert set(scored["category"]) <= {"language", "domain", "reasoning", "uninterpretable"}
    is_reasoning = scored["category"] == "reasoning"
    assert scored.loc[~is_reasoning, "mechanism"].isna().all()  # the second level only for reasoning units
    assert set(scored.loc[is_reasoning, "mechanism"].dropna()) <= {"output", "input_simple", "input_abstract"}
    truth = ground_truth_check(scored, cache)
    assert math.isclose(sum(truth["token_share"].values()), 1.0)
    for kind in ("adapter", "neuron"):
        assert math.isclose(sum(truth[kind]["mean_mass_share"].values()), 1.0, rel_tol=1e-6)


def test_feature_page_is_small_and_complete(smoke, cache, scored, tmp_path):
    _, model, _ = smoke
    effects = logit_effects(model, scored, cache.vocab)
    assert set(effects) == set(scored["name"])
    page = write_feature_page(scored, cache, tmp_path / "features.html", "smoke <test>", effects=effects)
    text = page.read_text()
    assert text.count('<div class="feature"') == len(scored) and f'data-features="{len(scored)}"' in text
    assert "smoke &lt;test&gt;" in text and "<|endoftext|>" not in text  # escaped
    assert page.stat().st_size < 2_000_000


@pytest.mark.slow
def test_feature_page_renders_in_a_headless_browser(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import check_feature_page

    try:
        check_feature_page.find_browser()
    except SystemExit as missing:
        pytest.fail(str(missing))
    page = check_feature_page.smoke_page(tmp_path)
    result = check_feature_page.check_page(page, tmp_path / "page.png")
    assert result["cards"] > 0 and result["png_bytes"] > 5000


@pytest.mark.slow
def test_notebook_04_runs_on_smoke(tmp_path):
    import papermill

    results_dir, figures_dir = tmp_path / "results", tmp_path / "figures"
    results_dir.mkdir()
    (results_dir / "01_train.json").write_text(json.dumps(
        {"config": "smoke", "models": {}, "analysis_model": RUN, "lowest_penalty_model": RUN}))
    papermill.execute_notebook(str(REPO / "notebooks/04_autointerp.ipynb"), str(tmp_path / "04.ipynb"),
                               parameters={"config": "smoke", "results_dir": str(results_dir),
                                           "figures_dir": str(figures_dir), "n_batches": 3, "progress": False},
                               cwd=str(REPO), kernel_name="python3", progress_bar=False)
    results = json.loads((results_dir / "04_autointerp.json").read_text())
    assert results["config"] == "smoke" and results["backend"] == "offline"
    for kind in ("adapter", "neuron"):
        assert {"detection_top", "detection_uniform", "n_scored"} <= set(results[kind])
    assert 0 <= results["reasoning_share"] <= 1
    assert (figures_dir / "04_autointerp.png").exists() and (figures_dir / "04_features.html").exists()


def test_cache_is_reused_only_for_the_same_config_and_run(smoke, monkeypatch, tmp_path):
    from tdlib.autointerp import run
    from tdlib.organism.traces import OrganismTraces

    pair, model, tokenizer = smoke
    monkeypatch.setattr(run, "cache_dir", lambda pair, name: tmp_path / name / "cache")
    data = OrganismTraces(tokenizer, "smoke", CONFIG.batch_size, CONFIG.seed, split="validation")
    built = []
    real_build = run.build_cache
    monkeypatch.setattr(run, "build_cache", lambda *a, **k: built.append(1) or real_build(*a, **k))
    first = run.cached_or_built(pair, RUN, model, tokenizer, data, CONFIG, progress=False)
    again = run.cached_or_built(pair, RUN, model, tokenizer, data, CONFIG, progress=False)
    assert len(built) == 1 and again.n_tokens == first.n_tokens
    assert again.model["run"] == run.run_fingerprint(pair, RUN) is not None
    changed = CacheConfig(**{**CONFIG.__dict__, "top_k": 4})
    run.cached_or_built(pair, RUN, model, tokenizer, data, changed, progress=False)
    assert len(built) == 2


def test_the_offline_mechanism_rule():
    from tdlib.autointerp.backends import MechanismJob

    writes_wait = [Context(["1", "+", "2", " wait"], 2, [0, 0, 1.0, 0]),
                   Context(["3", "-", "9", " wait"], 2, [0, 0, 2.0, 0])]
    on_one_token = [Context(["a", " wait", ","], 1, [0, 1.0, 0]), Context(["b", " wait", " no"], 1, [0, 1.0, 0])]
    mixed = [Context(["a", "x", "c"], 1, [0, 1.0, 0]), Context(["a", "y", "d"], 1, [0, 1.0, 0]),
             Context(["a", "z", "e"], 1, [0, 1.0, 0])]
    jobs = [MechanismJob("u", writes_wait, [" wait", ","]), MechanismJob("v", on_one_token, ["A"]),
            MechanismJob("w", mixed, ["q"]), MechanismJob("x", [], ["q"])]
    assert OfflineBackend().mechanism(jobs) == ["output", "input_simple", "input_abstract", None]
