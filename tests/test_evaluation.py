from pathlib import Path

import pytest

from tdlib.answers import extract_answer, extract_choice, is_equivalent, last_boxed, normalize_answer
from tdlib.evaluation import evaluate_items, recovered_gain, wilson_interval
from tdlib.generate import SamplingConfig, generate_greedy
from tdlib.organism.kind import benchmark_items as organism_items, check_response as check_organism_response
from tdlib.problems import BENCHMARKS, BenchItem, check_response, load_benchmark, render_prompts
from tdlib.pairs import resolve_pair

FIXTURES = Path(__file__).parent / "fixtures" / "bench"


# --- answer extraction and equivalence -------------------------------------------------------------------------

def test_last_boxed_handles_nesting_and_picks_the_last():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"so \boxed 5.") == "5."
    assert last_boxed(r"\boxed{\left(3, \frac{\pi}{2}\right)}") == r"\left(3, \frac{\pi}{2}\right)"
    assert last_boxed("no box here") is None


@pytest.mark.parametrize("prediction, gold", [
    (r"\frac{1}{2}", "0.5"),
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\dfrac12", r"\frac{1}{2}"),
    ("1/2", "0.50"),
    ("2,234", "2234"),
    ("1,000,000", "1000000"),
    (r"25\text{ cm}^2", "25"),
    ("10 cm", "10"),
    (r"\$18", "18"),
    (r"120^\circ", "120"),
    (r"50\%", "50"),
    ("x = 5", "5"),
    ("033", "33"),
    ("-3", "-3.0"),
    (r"-\frac{3}{4}", "-0.75"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
    (r"2\pi", r"\pi \cdot 2"),
])
def test_equivalent_answers(prediction, gold):
    assert is_equivalent(prediction, gold), (normalize_answer(prediction), normalize_answer(gold))


@pytest.mark.parametrize("prediction, gold", [
    (r"\frac{1}{3}", "0.33"),
    ("2,235", "2234"),
    ("2x", "2"),
    ("-5", "5"),
    (r"\sqrt{3}", r"\sqrt{2}"),
    ("", "0"),
    (None, "0"),
    ("1,2", "12"),
])
def test_different_answers(prediction, gold):
    assert not is_equivalent(prediction, gold)


def test_extract_answer_rules():
    assert extract_answer(r"... hence \boxed{7}. Actually \boxed{8}") == "8"
    assert extract_answer("So the answer is 42.") == "42"
    assert extract_answer("work\n#### 1,234") == "1,234"
    assert extract_answer("we get 3 then 17 apples") == "17"
    assert extract_answer("no numbers") is None


def test_extract_choice():
    assert extract_choice(r"so it is \boxed{C}") == "C"
    assert extract_choice("The answer is (B).") == "B"
    assert extract_choice("Answer: D") == "D"
    assert extract_choice("nothing") is None


# --- loaders on fixtures in the real schemas -------------------------------------------------------------------

def test_every_benchmark_has_a_fixture_that_loads():
    for name in BENCHMARKS:
        items = load_benchmark(name, path=FIXTURES / f"{name}.jsonl")
        assert items and all(i.question and i.answer for i in items), name


def test_math500_loader_and_checker():
    items = load_benchmark("math500", path=FIXTURES / "math500.jsonl")
    assert items[0].id == "test/prealgebra/1.json" and items[0].answer == r"\frac{1}{2}"
    assert items[0].meta["subject"] == "Prealgebra"
    assert check_response(items[0], r"Converting, x = 0.5, so \boxed{0.5}")
    assert check_response(items[1], r"Each angle is $\boxed{120^{\circ}}$")
    assert check_response(items[2], r"\boxed{\frac{2\sqrt{2}}{2}}")
    assert check_response(items[3], r"area \boxed{25 \text{ cm}^2}")
    assert not check_response(items[3], r"area \boxed{24}")


def test_gsm8k_gold_follows_the_hashes_and_drops_commas():
    items = load_benchmark("gsm8k", path=FIXTURES / "gsm8k.jsonl")
    assert [i.answer for i in items] == ["2,234", "2", "-3"]
    assert check_response(items[0], "They sold 2234 apples in total.")
    assert check_response(items[0], r"\boxed{2,234}")
    assert check_response(items[1], "The answer is $2.")
    assert check_response(items[2], r"\boxed{-3}") and not check_response(items[2], r"\boxed{3}")


def test_aime_and_amc_answers():
    aime24 = load_benchmark("aime2024", path=FIXTURES / "aime2024.jsonl")
    assert aime24[1].id == "2024-II-4" and aime24[1].answer == "33"
    assert check_response(aime24[1], r"so m+n = \boxed{033}")
    aime25 = load_benchmark("aime2025", path=FIXTURES / "aime2025.jsonl")
    assert aime25[0].answer == "70"
    amc = load_benchmark("amc23", path=FIXTURES / "amc23.jsonl")
    assert amc[0].answer == "27"  # stored as 27.0 in the hub schema
    assert check_response(amc[0], r"\boxed{27}") and check_response(amc[0], r"\boxed{27.0}")


def test_gpqa_shuffles_options_deterministically_and_keeps_the_key():
    first = load_benchmark("gpqa_diamond", path=FIXTURES / "gpqa_diamond.jsonl")
    again = load_benchmark("gpqa_diamond", path=FIXTURES / "gpqa_diamond.jsonl")
    assert first == again
    for item in first:
        letter = item.answer
        assert item.choices["ABCD".index(letter)] in ("The photon", "+7")
        assert check_response(item, rf"\boxed{{{letter}}}", kind="multiple_choice")
        wrong = next(c for c in "ABCD" if c != letter)
        assert not check_response(item, rf"\boxed{{{wrong}}}", kind="multiple_choice")


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("mmlu", path=FIXTURES / "math500.jsonl")
    with pytest.raises(FileNotFoundError):
        load_benchmark("math500", path=tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(KeyError, match="lacks"):
        load_benchmark("math500", path=bad)
    (tmp_path / "gsm.jsonl").write_text('{"question": "q", "answer": "no hashes"}\n')
    with pytest.raises(ValueError, match="####"):
        load_benchmark("gsm8k", path=tmp_path / "gsm.jsonl")


def test_render_prompts_without_a_chat_template_keeps_the_instruction():
    class Plain:
        chat_template = None

    items = load_benchmark("gpqa_diamond", path=FIXTURES / "gpqa_diamond.jsonl")
    prompt = render_prompts(Plain(), items[:1], kind="multiple_choice")[0]
    assert "A) " in prompt and "D) " in prompt and "\\boxed" in prompt


def test_render_prompts_follow_the_pairs_prompt_format():
    class Templated:
        chat_template = "unused"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}</user><assistant>"

    items = load_benchmark("gsm8k", path=FIXTURES / "gsm8k.jsonl")[:1]
    chat = render_prompts(Templated(), items)[0]
    plain = render_prompts(Templated(), items, prompt_format="plain")[0]
    assert chat.startswith("<user>") and chat.endswith("<assistant>")
    assert not plain.startswith("<user>") and plain.endswith("\n") and plain.strip() in chat


# --- statistics ----------------------------------------------------------------------------------------------------

def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    low, high = wilson_interval(0, 20)
    assert low == 0 and 0.1 < high < 0.2
    assert wilson_interval(20, 20)[1] == 1.0
    for n in (1, 7, 500):  # the interval always contains the estimate (no negative error bars at 0 or n)
        for k in (0, n // 3, n):
            low, high = wilson_interval(k, n)
            assert low <= k / n <= high


def test_recovered_gain():
    assert recovered_gain(0.8, 0.5, 0.9) == pytest.approx(0.75)
    assert recovered_gain(0.5, 0.5, 0.9) == 0
    assert recovered_gain(0.3, 0.5, 0.9) < 0
    assert recovered_gain(0.3, 0.5, 0.5) is None


def _scored(correct, n):
    return {"accuracy": correct / n, "accuracy_ci": list(wilson_interval(correct, n))}


def test_gain_interval_is_newcombes_from_the_wilson_intervals():
    from tdlib.evaluation import accuracy_gain

    # Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 vs 48/80, method 10 -> 0.0524 to 0.3339
    gain = accuracy_gain(base=_scored(48, 80), target=_scored(56, 70))
    assert gain["gain"] == pytest.approx(0.2)
    assert gain["gain_ci"] == pytest.approx([0.0524, 0.3339], abs=1e-4)
    assert gain["resolved"] and gain["half_width"] == pytest.approx(0.2 - 0.0524, abs=1e-4)


def test_recovered_gain_is_undefined_when_the_targets_gain_is_within_its_interval():
    from tdlib.evaluation import recovered_gains

    # target 2% vs base 0% on 50 problems: the formula alone gave a hybrid at 6% a recovered gain of 3.0
    assert recovered_gain(0.06, 0.0, 0.02) == pytest.approx(3.0)
    models = {"base": _scored(0, 50), "target": _scored(1, 50), "hybrid": _scored(3, 50)}
    gain = recovered_gains(models)
    assert not gain["resolved"] and gain["gain_ci"][0] <= 0 < gain["gain"] <= gain["half_width"]
    for entry in models.values():
        assert entry["recovered_gain"] is None
        assert entry["recovered_gain_reason"].startswith("undefined") and "+2.0%" in entry["recovered_gain_reason"]
    # the same 2% vs 0% on 500 problems (10 vs 0 correct) is resolved, and so is a large gain
    assert recovered_gains({"base": _scored(0, 500), "target": _scored(10, 500)})["resolved"]
    models = {"base": _scored(10, 50), "target": _scored(40, 50), "hybrid": _scored(25, 50)}
    assert recovered_gains(models)["resolved"]
    assert models["hybrid"]["recovered_gain"] == pytest.approx(0.5)
    assert models["hybrid"]["recovered_gain_reason"] is None
    assert models["target"]["recovered_gain"] == pytest.approx(1.0) and models["base"]["recovered_gain"] == 0


# --- generation on the smoke organism ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke():
    from tdlib.models import load_tokenizer
    from tdlib.pairs import resolve_pair
    from tdlib.runs import load_named

    pair = resolve_pair("smoke")
    return pair, load_named(pair, "adapter_l1_0.001"), load_tokenizer(pair.target)


def test_batched_left_padded_generation_matches_one_at_a_time(smoke):
    _, model, tokenizer = smoke
    items = organism_items("smoke", limit=6)
    prompts = [i.question for i in items]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1  # padding really happens
    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=30, batch_size=6, progress=False)
    single = generate_greedy(model, tokenizer, prompts, max_new_tokens=30, batch_size=1, progress=False)
    assert batched.responses == single.responses
    assert batched.response_tokens == single.response_tokens


def test_evaluate_items_on_the_organism(smoke):
    _, model, tokenizer = smoke
    items = organism_items("smoke", limit=8)
    scores, generation, correct = evaluate_items(model, tokenizer, items, benchmark="organism",
                                                 max_new_tokens=30, batch_size=8)
    assert len(correct) == 8 and scores["accuracy"] == sum(correct) / 8
    assert scores["accuracy_ci"][0] <= scores["accuracy"] <= scores["accuracy_ci"][1]
    assert scores["mean_response_tokens"] == sum(generation.response_tokens) / 8
    # the checker agrees with the organism's own rule on a hand-made correct response
    item = items[0]
    assert BenchItem(item.id, item.question, item.answer) == item
    assert check_organism_response(item, f" 1+1=2; A: {item.answer}")
    assert not check_organism_response(item, f" A: {int(item.answer) + 1}")


def test_sampled_generation_is_seeded(smoke):
    _, model, tokenizer = smoke
    items = organism_items("smoke", limit=4)
    sampling = SamplingConfig(temperature=1.0, seed=3)
    first = evaluate_items(model, tokenizer, items, benchmark="organism", max_new_tokens=15, sampling=sampling)[1]
    again = evaluate_items(model, tokenizer, items, benchmark="organism", max_new_tokens=15, sampling=sampling)[1]
    assert first.responses == again.responses
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0)


# --- notebook 03 helpers ---------------------------------------------------------------------------------------------

TRAIN = {"models": {"adapter_l1_0.001": {"kind": "adapter", "l1_weight": 0.001},
                    "adapter_l1_0.01": {"kind": "adapter", "l1_weight": 0.01},
                    "hybrid": {"kind": "hybrid"}, "mlp_finetune": {"kind": "mlp_finetune"},
                    "local_mse": {"kind": "local_mse", "l1_weight": 0.003}},
         "analysis_model": "adapter_l1_0.01", "lowest_penalty_model": "adapter_l1_0.001"}


def test_benchmark_model_names_order():
    from tdlib.evaluation import benchmark_model_names

    assert benchmark_model_names(TRAIN) == ["base", "target", "hybrid", "adapter_l1_0.01", "adapter_l1_0.001",
                                            "mlp_finetune", "local_mse"]
    assert "local_mse" not in benchmark_model_names(TRAIN, include_local_mse=False)


def _entry(accuracy, length, base=0.5, target=0.9):
    return {"accuracy": accuracy, "accuracy_ci": list(wilson_interval(int(accuracy * 100), 100)),
            "mean_response_tokens": length, "recovered_gain": recovered_gain(accuracy, base, target)}


def test_benchmark_checks_pass_and_fail_on_the_numbers():
    from tdlib.evaluation import benchmark_checks

    models = {"base": _entry(0.5, 5), "target": _entry(0.9, 50), "hybrid": _entry(0.52, 30),
              "adapter_l1_0.01": _entry(0.8, 45), "adapter_l1_0.001": _entry(0.75, 70)}
    checks = benchmark_checks(models, TRAIN)
    assert checks["length_ratio_middle"] == pytest.approx(0.9) and checks["length_within_25pct_at_middle"]
    assert checks["recovered_gain_lowest"] == pytest.approx(0.625) and checks["recovers_half_at_lowest"]
    assert checks["recovered_gain_hybrid"] == pytest.approx(0.05) and checks["hybrid_recovers_far_less"]
    models["adapter_l1_0.01"] = _entry(0.8, 70)
    models["adapter_l1_0.001"] = _entry(0.6, 70)
    models["hybrid"] = _entry(0.58, 30)
    checks = benchmark_checks(models, TRAIN)
    assert not checks["length_within_25pct_at_middle"] and not checks["recovers_half_at_lowest"]
    assert not checks["hybrid_recovers_far_less"]


def test_benchmark_figure_draws_every_model(tmp_path):
    from tdlib.plots import benchmark_figure
    from tdlib.plots import save_figure

    models = {"base": _entry(0.5, 5), "target": _entry(0.9, 50), "hybrid": _entry(0.0, 30),
              "adapter_l1_0.01": _entry(1.0, 45)}
    fig = benchmark_figure(models, "organism", 100, TRAIN)
    accuracy_axis, length_axis = fig.axes
    assert len(accuracy_axis.patches) == 4 and len(length_axis.patches) == 4
    assert accuracy_axis.get_ylabel() and length_axis.get_ylabel()
    assert save_figure(fig, "bench", tmp_path).exists()


def test_hesitations_are_counted_as_words_in_any_case():
    from tdlib.evaluation import count_hesitations

    assert count_hesitations("2-6=-4; wait, check: ok", "wait") == 1
    assert count_hesitations("So x=3.\n\nWait, no. Hmm, wait... WAIT", "wait") == 3
    assert count_hesitations("we await the answer; waiting is not it; waits", "wait") == 0
    assert count_hesitations("Wait", " wait") == 1


def test_pair_checks_ask_the_organism_for_its_design_and_a_real_pair_for_a_difference():
    from tdlib.evaluation import pair_checks

    def model(accuracy, tokens, wait_rate):
        return {"accuracy": accuracy, "mean_response_tokens": tokens, "wait_rate": wait_rate,
                "by_style": {"steps": {"accuracy": accuracy, "steps_share": 1.0}}}

    results = {"base": model(0.5, 10, 0.0), "target": model(0.9, 40, 0.3), "hybrid": model(0.45, 12, 0.0),
               "target_without_hesitation": model(0.6, 30, 0.0), "diagnostics": {"hybrid_kl": 1.0},
               "p_hesitation": {"base": {"all_mechanisms": 0.1}, "target": {"all_mechanisms": 0.8}}}
    organism_pair, real_pair = resolve_pair("smoke", build=False), resolve_pair("hub:a/b->a/c", build=False)
    assert all(pair_checks(results, organism_pair).values())
    assert all(pair_checks(results, real_pair).values())
    results["target"] = model(0.6, 20, 0.0)
    organism = pair_checks(results, organism_pair)
    assert not organism["target accuracy >= base + 0.30"] and not organism["target length >= 3x base length"]
    real = pair_checks(results, real_pair)
    assert real["target is more accurate than base"] and not real["target says wait more often than base"]


def test_every_evaluation_counts_the_pairs_own_hesitation_word(monkeypatch):
    """A pair whose word is "Hmm" reports how often it says "Hmm", not "wait" (benchmarks, pair evaluation and
    notebook 06's conditions), and a "wait" in the text does not count for it."""
    import dataclasses

    import tdlib.evaluation as evaluation
    from tdlib.generate import Generation
    from tdlib.pairs import resolve_pair
    from tdlib.problems import EvalSet
    from tdlib.ablation import run_condition

    def fake_generate(model, tokenizer, prompts, **kwargs):
        return Generation(prompts, ["Hmm, so 2.", "wait, 2."], [4, 3])

    monkeypatch.setattr(evaluation, "generate_greedy", fake_generate)
    items = [BenchItem("a", "Q: 1+1=?", "2"), BenchItem("b", "Q: 3-1=?", "2")]
    scores = evaluate_items(None, None, items, benchmark="organism", max_new_tokens=5, hesitation_word="Hmm")[0]
    assert scores["wait_rate"] == 0.5
    evalset = EvalSet("organism", items, 5, "test")
    metrics, _ = run_condition(None, None, evalset, word="Hmm")
    assert metrics["wait_rate"] == 0.5 and metrics["n_wait"] == 1
    pair = dataclasses.replace(resolve_pair("smoke", build=False), hesitation_word="Hmm")
    monkeypatch.setattr(evaluation, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(evaluation, "load_named", lambda pair, name: None)
    results, _ = evaluation.run_benchmark(pair, ["base"], items, benchmark="organism", max_new_tokens=5, progress=False)
    assert results["base"]["wait_rate"] == 0.5
    assert evaluation.run_benchmark(dataclasses.replace(pair, hesitation_word="Oh"), ["base"], items,
                               benchmark="organism", max_new_tokens=5, progress=False)[0]["base"]["wait_rate"] == 0


def test_every_benchmark_is_scored_with_each_model_loaded_once_and_written_per_benchmark(monkeypatch, tmp_path):
    import tdlib.evaluation as evaluation
    from tdlib.generate import Generation
    from tdlib.pairs import resolve_pair
    from tdlib.plots import benchmarks_figure
    from tdlib.problems import EvalSet

    loaded = []
    answers = {"base": "1", "target": "2", "hybrid": "1"}  # right on the first benchmark; "2" right on both below

    def fake_generate(model, tokenizer, prompts, **kwargs):
        response = f"A: {answers[model]}"
        return Generation(prompts, [f"wait, {response}" if model == "target" else response] * len(prompts),
                          [3] * len(prompts))

    monkeypatch.setattr(evaluation, "generate_greedy", fake_generate)
    monkeypatch.setattr(evaluation, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(evaluation, "load_named", lambda pair, name: loaded.append(name) or name)
    twos = [BenchItem(str(i), f"Q: {i}+{2 - i}=?", "2") for i in range(3)]
    evalsets = [EvalSet("organism", [BenchItem("a", "Q: 0+1=?", "1")] * 2 + twos[:1], 5, "first"),
                EvalSet("organism", twos, 7, "second")]
    pair = resolve_pair("smoke", build=False)
    results = evaluation.run_benchmarks(pair, ["base", "target", "hybrid"], evalsets, progress=False)
    assert loaded == ["base", "target", "hybrid"]  # once each, not once per benchmark
    assert [round(r.models["target"]["accuracy"], 3) for r in results] == [0.333, 1.0]
    assert [r.models["base"]["accuracy"] for r in results] == [pytest.approx(2 / 3), 0.0]
    summaries = [evaluation.benchmark_summary(r, TRAIN) for r in results]
    written = evaluation.benchmark_results(summaries, None)
    assert written["n_problems"] == 3 and written["max_new_tokens"] == 5 and written["decoding"] == {"sampled": False}
    assert written["models"] is summaries[0]["models"] and written["checks"] == summaries[0]["checks"]
    assert "by_benchmark" not in evaluation.benchmark_results(summaries[:1], None)
    summaries[1]["benchmark"] = "second"
    written = evaluation.benchmark_results(summaries, None)
    assert list(written["by_benchmark"]) == ["organism", "second"]
    assert written["by_benchmark"]["second"]["max_new_tokens"] == 7
    assert "target gain over base" in evaluation.target_gain_line(summaries[1])
    fig = benchmarks_figure(summaries, TRAIN)
    assert len(fig.axes) == 4 and "second" in fig.axes[2].get_title()
    assert len(benchmarks_figure(summaries[:1], TRAIN).axes) == 2


def test_pass_at_1_over_samples_with_an_interval_over_problems_and_the_budget_counter(monkeypatch):
    import tdlib.evaluation as evaluation
    from tdlib.generate import Generation

    seeds = []

    def fake_sampled(model, tokenizer, prompts, *, max_new_tokens, sampling, **kwargs):
        seeds.append(sampling.seed)
        right = sampling.seed % 2 == 0  # even seeds answer every problem, odd seeds none
        return Generation(prompts, [f" A: {2 if right else 3}"] * len(prompts), [4, max_new_tokens])

    monkeypatch.setattr(evaluation, "generate_sampled", fake_sampled)
    items = [BenchItem("a", "Q: 1+1=?", "2"), BenchItem("b", "Q: 3-1=?", "2")]
    sampling = SamplingConfig(seed=10, n_samples=4)
    scores, generation, correct = evaluate_items(None, None, items, benchmark="organism", max_new_tokens=9,
                                                 sampling=sampling)
    assert seeds == [10, 11, 12, 13] and len(generation.responses) == len(correct) == 8
    assert scores["accuracy"] == 0.5 and scores["n_samples"] == 4
    assert scores["accuracy_ci"] == [0.5, 0.5]  # every problem is right on exactly half its samples
    assert scores["hit_budget_share"] == 0.5  # one response of each pair ran into the 9-token budget
    mean, interval = evaluation.pass_at_1([[True, False, True], [True, False, False]], n_bootstrap=2000)
    assert mean == 0.5 and interval[0] < 0.5 < interval[1]
    with pytest.raises(ValueError, match="n_samples"):
        SamplingConfig(n_samples=0)
