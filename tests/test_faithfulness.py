import numpy as np
import pytest
import torch

from tdlib.faithfulness import (FaithfulnessConfig, bootstrap_ratio, compare, evaluate_faithfulness,
                                layer_subsets, model_names, onpolicy_batches, subset_finding, subset_kl,
                                summarize, target_passes)
from tdlib.faithfulness import evaluate_replacement
from tdlib.splice import mlp_choice
from tdlib.runs import load_named


@pytest.fixture(scope="module")
def smoke():
    from tdlib.organism.kind import benchmark_items as organism_items
    from tdlib.models import load_tokenizer
    from tdlib.pairs import resolve_pair
    from tdlib.runs import load_named

    pair = resolve_pair("smoke")
    tokenizer = load_tokenizer(pair.target)
    target = load_named(pair, "target")
    prompts = [i.question for i in organism_items("smoke", limit=12)]
    batches = onpolicy_batches(target, tokenizer, prompts, max_new_tokens=40, batch_size=6, progress=False)
    return pair, tokenizer, target, prompts, batches


def test_onpolicy_text_is_the_targets_own_greedy_continuation(smoke):
    _, tokenizer, target, prompts, batches = smoke
    assert sum(b["input_ids"].shape[0] for b in batches) == len(prompts)
    for offset, batch in zip(range(0, len(prompts), 6), batches):
        with torch.no_grad():
            predicted = target(**batch).logits.argmax(-1)
        for row in range(batch["input_ids"].shape[0]):
            n_prompt = len(tokenizer(prompts[offset + row])["input_ids"])
            length = int(batch["attention_mask"][row].sum())
            assert length > n_prompt  # the target responded
            # every response token is the target's argmax given the text before it
            assert torch.equal(predicted[row, n_prompt - 1:length - 1], batch["input_ids"][row, n_prompt:length])
            # scored: exactly the positions predicting a response token (or the end-of-sequence after it)
            scored = batch["score_mask"][row].nonzero().flatten().tolist()
            assert scored == list(range(n_prompt - 1, length - 1))


def test_onpolicy_scoring_covers_the_response_only_unless_the_prompt_is_included(smoke):
    pair, tokenizer, target, prompts, _ = smoke
    batches = onpolicy_batches(target, tokenizer, prompts[:4], max_new_tokens=48, batch_size=4, progress=False)
    passes = target_passes(target, batches)
    scored = sum(int(p.scored.sum()) for p in passes)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts[:4])
    assert 0 < scored <= 4 * 48 + 4  # 4 rollouts of at most 48 new tokens, each with its end-of-sequence
    assert scored == real - prompt_tokens  # every response token and EOS is predicted from the position before
    with_prompt = onpolicy_batches(target, tokenizer, prompts[:4], max_new_tokens=48, batch_size=4,
                                   include_prompt=True, progress=False)
    assert sum(int(p.scored.sum()) for p in target_passes(target, with_prompt)) == real - 4  # all but the last
    assert torch.equal(with_prompt[0]["input_ids"], batches[0]["input_ids"])
    model = load_named(pair, "adapter_l1_0.01")
    response_only = summarize(compare(model, batches, passes), n_bootstrap=20)
    assert response_only["n_tokens"] == scored


def test_target_against_itself_is_perfectly_faithful(smoke):
    _, _, target, _, batches = smoke
    passes = target_passes(target, batches)
    result = summarize(compare(target, batches, passes), n_bootstrap=50)
    assert result["kl"] == pytest.approx(0, abs=1e-6) and result["top1_error"] == 0
    assert max(result["nmse_by_layer"]) == pytest.approx(0, abs=1e-10)
    assert result["l0"] is None
    assert result["n_tokens"] == sum(int(b["score_mask"].sum()) for b in batches)


def test_comparison_agrees_with_evaluate_replacement(smoke):
    pair, _, target, _, batches = smoke
    from tdlib.runs import load_named

    model = load_named(pair, "adapter_l1_0.01")
    # without a score_mask the scored positions are the KL token set, the one evaluate_replacement uses
    batches = [{k: v for k, v in b.items() if k != "score_mask"} for b in batches]
    ours = summarize(compare(model, batches, target_passes(target, batches)), n_bootstrap=50)
    reference = evaluate_replacement(model, batches, "adapter")  # runs the target through the splice instead
    assert ours["n_tokens"] == reference["n_tokens"]
    assert ours["nmse_layers"] == pytest.approx(reference["nmse_layers"], rel=1e-4)
    assert ours["kl"] == pytest.approx(reference["kl"], rel=1e-4)
    assert ours["top1_error"] == pytest.approx(reference["top1_error"])
    assert ours["nmse_by_layer"] == pytest.approx(reference["nmse_by_layer"], rel=1e-4, abs=1e-9)
    assert ours["l0"] == pytest.approx(reference["l0"], rel=1e-6)
    assert ours["kl"] > 0 and ours["kl_ci"][0] <= ours["kl"] <= ours["kl_ci"][1]
    assert ours["top1_error_ci"][0] <= ours["top1_error"] <= ours["top1_error_ci"][1]


def test_recomputed_target_passes_give_the_cached_results(smoke):
    pair, _, target, _, batches = smoke
    from tdlib.faithfulness import RecomputedPasses
    from tdlib.runs import load_named

    model = load_named(pair, "adapter_l1_0.01")
    lazy = target_passes(target, batches, cache=False)
    assert isinstance(lazy, RecomputedPasses) and len(lazy) == len(batches)
    cached = summarize(compare(model, batches, target_passes(target, batches)), n_bootstrap=50)
    recomputed = summarize(compare(model, batches, lazy), n_bootstrap=50)
    assert recomputed == cached
    assert subset_kl(model, batches, lazy, {"all": [0, 1]}, progress=False) == subset_kl(
        model, batches, target_passes(target, batches), {"all": [0, 1]}, progress=False)


def test_uncertain_tokens_are_the_targets_low_confidence_ones(smoke):
    _, _, target, _, batches = smoke
    everything = target_passes(target, batches, uncertain_threshold=1.0)
    assert all(torch.equal(p.uncertain, p.scored) for p in everything)
    strict = target_passes(target, batches, uncertain_threshold=0.8)
    for p in strict:
        top = p.log_probs.max(-1).values.exp()
        assert (top[p.uncertain] <= 0.8).all() and (top[p.scored & ~p.uncertain] > 0.8).all()


def test_subset_kl_all_layers_matches_the_full_adapter_model(smoke):
    pair, _, target, _, batches = smoke
    from tdlib.runs import load_named

    model = load_named(pair, "adapter_l1_0.01")
    passes = target_passes(target, batches)
    subsets = layer_subsets(2)
    assert subsets == {"layer 0": [0], "layer 1": [1], "all": [0, 1]}
    kls = subset_kl(model, batches, passes, subsets, progress=False)
    full = compare(model, batches, passes)
    assert kls["all"] == pytest.approx(full.kl.sum() / full.tokens.sum(), rel=1e-6)
    with mlp_choice(model, ["adapter", "target"]):
        only_first = compare(model, batches, passes)
    assert kls["layer 0"] == pytest.approx(only_first.kl.sum() / only_first.tokens.sum(), rel=1e-6)
    assert kls["layer 0"] != pytest.approx(kls["all"])


def test_layer_subsets():
    four = layer_subsets(4, plan="all")
    assert list(four)[:4] == ["layer 0", "layer 1", "layer 2", "layer 3"]
    assert four["first half"] == [0, 1] and four["second half"] == [2, 3] and four["all"] == [0, 1, 2, 3]
    assert four["layers 1-2"] == [1, 2] and four["layers 0-2"] == [0, 1, 2]
    assert "layers 0-1" not in four  # the same layers as "first half"
    assert len({tuple(v) for v in four.values()}) == len(four) == 10  # every contiguous block once
    big = layer_subsets(28, plan="all")
    assert big["all"] == list(range(28)) and "layers 0-26" in big and "layers 1-27" in big
    assert "layers 3-9" not in big and len(big) < 100


def test_the_paper_subset_plan_grows_with_the_layers_not_their_square():
    thirty = layer_subsets(30)  # the default plan: single layers, first k and last k for k = 2, 4, 8, 16, all
    assert len(thirty) == 30 + 2 * 4 + 1 and len(layer_subsets(30, plan="all")) == 87
    assert thirty["first 8"] == list(range(8)) and thirty["last 16"] == list(range(14, 30))
    assert thirty["all"] == list(range(30)) and "first half" not in thirty
    custom = layer_subsets(6, ks=[1, 3, 6, 9])  # k = 1 is a single layer, k >= 6 is all layers
    assert list(custom) == [f"layer {i}" for i in range(6)] + ["first 3", "last 3", "all"]
    with pytest.raises(ValueError, match="subset plan 'some'"):
        layer_subsets(4, plan="some")
    with pytest.raises(ValueError, match=">= 1"):
        layer_subsets(4, ks=[0])


def test_subset_finding_reports_violations():
    assert subset_finding({"layer 0": 0.1, "layer 1": 0.2, "all": 0.3})["every_subset_below_all"]
    finding = subset_finding({"layer 0": 0.1, "layer 1": 0.4, "all": 0.3})
    assert not finding["every_subset_below_all"]
    assert finding["worst_subset"] == "layer 1" and finding["subsets_at_or_above_all"] == ["layer 1"]


def test_bootstrap_resamples_sequences():
    # identical per-sequence ratios: no sampling variation at all
    low, high = bootstrap_ratio(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0]), 200, seed=0)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 50, size=40).astype(float)
    values = rng.random(40) * tokens
    interval = bootstrap_ratio(values, tokens, 500, seed=0)
    assert interval == bootstrap_ratio(values, tokens, 500, seed=0)  # seeded
    assert interval[0] < values.sum() / tokens.sum() < interval[1]
    # one long, very bad sequence dominates: whole-sequence resampling gives a wide interval
    wide = bootstrap_ratio(np.array([0.0] * 9 + [100.0]), np.array([10.0] * 9 + [100.0]), 500, seed=0)
    assert wide[1] - wide[0] > 0.5


def test_config_validates():
    with pytest.raises(ValueError, match="n_bootstrap"):
        FaithfulnessConfig(n_bootstrap=1)
    with pytest.raises(ValueError, match="uncertain_threshold"):
        FaithfulnessConfig(uncertain_threshold=0)


def test_evaluate_faithfulness_end_to_end(smoke):
    pair, _, _, _, batches = smoke
    train_results = {"models": {"adapter_l1_0.01": {"kind": "adapter"}, "mlp_finetune": {"kind": "mlp_finetune"}}}
    names = model_names(train_results)
    assert names == ["base", "hybrid", "adapter_l1_0.01", "mlp_finetune"]
    results = evaluate_faithfulness(pair, names, batches[:1], FaithfulnessConfig(n_bootstrap=20), progress=False)
    assert set(results) == set(names)
    assert results["adapter_l1_0.01"]["l0"] > 0 and results["hybrid"]["l0"] is None
    for name, entry in results.items():
        assert len(entry["nmse_by_layer"]) == 3
        if name != "base":  # spliced models share the target's embeddings (the base too when fine-tuning froze them)
            assert entry["nmse_by_layer"][0] == pytest.approx(0, abs=1e-12)
        assert entry["nmse_layers"] == pytest.approx(sum(entry["nmse_by_layer"][1:]) / 2)
        assert entry["nmse_with_embedding"] == pytest.approx(sum(entry["nmse_by_layer"]) / 3)
    assert results["base"]["nmse_layers"] > 0 and results["base"]["kl"] > 0


def test_figures_draw(tmp_path):
    from tdlib.plots import nmse_figure, output_faithfulness_figure, subset_figure

    def entry(l0, kl, top1):
        return {"l0": l0, "kl": kl, "kl_ci": [kl * 0.9, kl * 1.1], "top1_error": top1,
                "top1_error_ci": [top1 * 0.9, top1 * 1.1], "kl_uncertain": kl * 3,
                "kl_uncertain_ci": [kl * 2, kl * 4], "top1_error_uncertain": top1 * 3,
                "top1_error_uncertain_ci": [top1 * 2, top1 * 4], "nmse_by_layer": [0, 0.1, 0.2]}

    models = {"hybrid": entry(None, 1.0, 0.5), "adapter_l1_0.01": entry(2.0, 0.1, 0.05),
              "adapter_l1_0.001": entry(20.0, 0.05, 0.02), "mlp_finetune": entry(None, 0.01, 0.01)}
    for suffix in ("", "_uncertain"):
        fig = output_faithfulness_figure(models, suffix=suffix)
        assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_xlabel().startswith("L0")
        assert len(fig.axes[0].get_lines()) >= 2
    assert nmse_figure(models).axes[0].get_ylabel()
    singles, families = subset_figure({"layer 0": 0.1, "layer 1": 0.3, "all": 0.2}, "m").axes
    assert [p.get_height() for p in singles.patches] == [0.1, 0.3]  # one bar per single layer, by index
    assert singles.patches[1].get_facecolor() != singles.patches[0].get_facecolor()  # 0.3 >= all: marked
    from tdlib.faithfulness import layer_subsets

    subsets = layer_subsets(30)  # 39 subsets of a 30-layer model: a fixed-size figure, k on the x axis
    fig = subset_figure({name: 0.01 * len(layers) for name, layers in subsets.items()}, "m", subsets)
    assert fig.get_size_inches()[0] <= 12 and len(fig.axes[0].patches) == 30
    first_k = next(line for line in fig.axes[1].get_lines() if line.get_label() == "first k layers")
    assert list(first_k.get_xdata()) == [1, 2, 4, 8, 16, 30]
