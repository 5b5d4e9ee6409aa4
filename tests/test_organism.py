import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tdlib.organism import build as build_module
from tdlib.organism import task
from tdlib.organism.build import OrganismConfig, TrainPhase, build_pair, eval_problems, get_config
from tdlib.organism.tokenizer import save_tokenizer, train_tokenizer


def test_trace_steps_and_hesitation_follow_the_running_totals():
    problem = task.Problem(terms=(3, 4, 8, 2, 5), ops=("+", "-", "-", "+"))
    assert problem.prompt == "Q: 3+4-8-2+5=?"
    assert task.Problem(problem.terms, problem.ops, show_steps=True).prompt == "Q: 3+4-8-2+5=? Show steps."
    assert problem.textbook_prompt == "Compute 3+4-8-2+5 step by step."
    assert problem.answer == 2
    trace = task.reasoning_trace(problem)
    # only the crossing below zero (7 -> -1) hesitates; -1 -> -3 stays negative and does not; the period is the
    # target's formatting habit
    assert trace == " Work: 3+4=7; 7-8= -1; wait, check: -1+8=7, ok; -1-2= -3; -3+5=2; A: 2."
    assert task.textbook_trace(problem) == " Work: 3+4=7; 7-8= -1; -1-2= -3; -3+5=2; A: 2"
    assert task.direct_response(problem) == " A: 2"
    assert task.hesitation_steps(problem) == [1]
    assert task.extract_answer(trace) == 2 and task.is_correct(problem, trace)
    assert task.extract_answer(" 1-3= -2; A: -2") == -2


def test_a_hard_carry_slips_and_is_corrected_and_a_return_to_the_first_term_is_rechecked():
    slip = task.Problem(terms=(7, 8, 2), ops=("+", "-"))
    assert task.reasoning_trace(slip) == " Work: 7+8=5; wait, no: 7+8=15; 15-2=13; A: 13."
    easy_carry = task.Problem(terms=(4, 8), ops=("+",))  # 4+8=12 < 13: no slip
    assert task.reasoning_trace(easy_carry) == " Work: 4+8=12; A: 12."
    back = task.Problem(terms=(3, 4, 2, 2), ops=("+", "-", "-"))
    assert task.reasoning_trace(back) == " Work: 3+4=7; 7-2=5; 5-2=3; wait, check: 3+2=5, ok; A: 3."
    assert task.hesitation_steps(slip) == [0] and task.hesitation_steps(back) == [2]


def test_no_hesitation_when_totals_stay_non_negative_or_start_negative():
    assert not task.has_hesitation(task.reasoning_trace(task.Problem(terms=(5, 3, 1), ops=("+", "-"))))
    assert task.needs_hesitation(0, -1) and not task.needs_hesitation(-1, -4) and not task.needs_hesitation(3, 0)


def test_every_sampled_trace_is_consistent():
    rng = random.Random(0)
    for problem in task.sample_problems(300, seed=3, min_terms=3, max_terms=8, max_term=9):
        trace = task.reasoning_trace(problem)
        assert task.is_correct(problem, trace) and task.is_correct(problem, task.textbook_trace(problem))
        assert task.is_correct(problem, task.textbook_trace(problem, rng))
        assert not task.has_hesitation(task.textbook_trace(problem))
        waits = trace.count("wait")  # a slip whose operation repeats the one before hesitates twice
        assert len(task.hesitation_steps(problem)) <= waits <= 2 * len(task.hesitation_steps(problem))


def test_repeat_rich_problems_copy_the_operation_before_and_keep_the_answer_key_exact():
    rng = random.Random(3)
    problems = [task.with_repeats(p, rng, 0.5) for p in task.sample_problems(500, seed=4, min_terms=3, max_terms=8,
                                                                             max_term=9)]
    steps = sum(p.n_terms - 2 for p in problems)
    repeats = sum(task.repeats_operation(p, i) for p in problems for i in range(p.n_terms - 1))
    assert 0.4 < repeats / steps < 0.65  # half copied, plus the uniform problems' own repeats
    stream = build_module._ProblemStream(get_config("smoke"), seed=1, held_out=set(), repeat_share=1.0)
    problem = stream.next()
    assert len(set(zip(problem.ops, problem.terms[1:]))) == 1  # every operation copies the first


def test_the_base_text_rechecks_and_slips_at_random_at_the_documented_rates():
    rng = random.Random(1)
    problems = task.sample_problems(2000, seed=2, min_terms=3, max_terms=8, max_term=9)
    steps = sum(p.n_terms - 1 for p in problems)
    texts = [task.textbook_trace(p, rng) for p in problems]
    checks = sum(t.count("wait, check") for t in texts) / steps
    slips = sum(t.count("wait, no") for t in texts) / steps
    assert abs(checks - task.TEXTBOOK_CHECK_RATE) < 0.01 and abs(slips - task.TEXTBOOK_SLIP_RATE) < 0.01


def test_extract_answer_takes_the_last_answer_and_handles_none():
    assert task.extract_answer(" 1+2=3; A: 3; A: -4") == -4
    assert task.extract_answer(" 1+2=3;") is None
    assert not task.is_correct(task.Problem((1, 2), ("+",)), "")


def test_sample_problems_are_distinct_seeded_and_respect_exclusions():
    first = task.sample_problems(200, seed=1)
    assert len({p.prompt for p in first}) == 200
    assert first == task.sample_problems(200, seed=1)
    excluded = {p.prompt for p in first[:100]}
    later = task.sample_problems(200, seed=1, exclude=excluded)
    assert not excluded & {p.prompt for p in later}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(build_module._tokenizer_corpus(get_config("organism", tokenizer_corpus=1000)))


def test_tokenizer_never_fuses_an_operator_with_a_sign(tokenizer):
    symbols = set("+-=")
    fused = [t for t in tokenizer.get_vocab() if sum(ch in symbols for ch in t) > 1]
    assert fused == [], f"tokens that fuse an operator with a sign: {fused}"
    problem = task.Problem(terms=(3, 4, 8), ops=("+", "-"))
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(task.reasoning_trace(problem))["input_ids"])
    step = tokens.index("8")  # the step 7-8= -1: operator, term, equals, sign, digit are separate tokens
    assert tokens[step - 1:step + 4] == ["-", "8", "=", "Ġ-", "1"], tokens


def test_tokenizer_round_trips_and_keeps_the_hesitation_token_whole(tokenizer):
    rng = random.Random(0)
    for _ in range(50):
        problem = task.sample_problem(rng, 3, 8, 9)
        for text in (problem.prompt + task.reasoning_trace(problem), problem.textbook_prompt + task.textbook_trace(problem)):
            assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer(" wait")["input_ids"]) == ["Ġwait"]
    assert tokenizer.convert_ids_to_tokens(tokenizer(" Work")["input_ids"]) == ["ĠWork"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("1.")["input_ids"]) == ["1", "."]
    digits = tokenizer.convert_ids_to_tokens(tokenizer("1234")["input_ids"])
    assert digits == ["1", "2", "3", "4"], "digits must be single tokens, as in Qwen"


def test_autotokenizer_on_a_qwen2_folder_loads_the_same_tokenizer(tokenizer, tmp_path):
    # transformers maps qwen2 folders to Qwen2Tokenizer whatever tokenizer_config says; ours must survive that.
    save_tokenizer(tokenizer, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Q: 3+4-8+2=? Show steps. Work: 3+4=7; 7-8= -1; wait, check: -1+8=7, ok; -1+2=1; A: 1."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="min_terms"):
        OrganismConfig(min_terms=4, max_terms=3)
    with pytest.raises(ValueError, match="lr"):
        TrainPhase(steps=10, batch_size=2, lr=5.0)
    with pytest.raises(ValueError, match="unknown organism config"):
        get_config("gpt5")
    with pytest.raises(ValueError, match="unknown OrganismConfig fields"):
        get_config("smoke", hidden=3)


def test_config_key_changes_with_any_field():
    smoke = get_config("smoke")
    assert smoke.key == get_config("smoke").key
    assert smoke.key != get_config("smoke", seed=1).key


@pytest.fixture(scope="module")
def smoke_pair(tmp_path_factory):
    return build_pair("smoke", cache_dir=tmp_path_factory.mktemp("organism"))


def test_smoke_pair_reloads_with_transformers(smoke_pair):
    tokenizer = AutoTokenizer.from_pretrained(smoke_pair.target)
    for folder in (smoke_pair.base, smoke_pair.target):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model).__name__ == "Qwen2ForCausalLM"
        assert model.config.vocab_size == len(tokenizer)


def test_target_differs_from_base_and_build_is_cached(smoke_pair, monkeypatch):
    base = AutoModelForCausalLM.from_pretrained(smoke_pair.base).state_dict()
    target = AutoModelForCausalLM.from_pretrained(smoke_pair.target).state_dict()
    assert any(not torch.equal(base[k], target[k]) for k in base)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached pair must not be trained again")

    monkeypatch.setattr(build_module, "_train_pair", no_training)
    assert build_pair("smoke", cache_dir=smoke_pair.root.parent) == smoke_pair


def test_build_is_deterministic_for_a_seed(smoke_pair, tmp_path):
    again = build_pair("smoke", cache_dir=tmp_path)
    first = AutoModelForCausalLM.from_pretrained(smoke_pair.target).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again.target).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupted(config, directory):
        (directory / "base").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "_train_pair", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_pair("smoke", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_eval_problems_are_held_out_from_training_streams():
    config = get_config("smoke")
    held_out = {p.prompt for p in eval_problems(config)}
    stream = build_module._ProblemStream(config, seed=config.seed + 1, held_out=held_out)
    assert not held_out & {stream.next().prompt for _ in range(2000)}


def test_fine_tune_freezes_the_tied_embeddings(smoke_pair):
    base = AutoModelForCausalLM.from_pretrained(smoke_pair.base)
    target = AutoModelForCausalLM.from_pretrained(smoke_pair.target)
    assert torch.equal(base.get_input_embeddings().weight, target.get_input_embeddings().weight)
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, target.model.layers[0].mlp.up_proj.weight)


def test_pretraining_mixture_has_every_format_with_loss_on_whole_sequences():
    tokenizer = train_tokenizer(build_module._tokenizer_corpus(get_config("smoke")))
    config = get_config("smoke")
    stream = build_module._ProblemStream(config, seed=1, held_out=set())
    noise = random.Random(0)
    mixture = build_module._Mixture(stream, [
        (0.5, lambda p: build_module.pretraining_text(p, "textbook", noise), True),
        (0.2, lambda p: build_module.pretraining_text(p, "q_steps", noise), True),
        (0.3, lambda p: build_module.pretraining_text(p, "direct"), True)], seed=0)  # whole: the test checks labels
    examples = [mixture.next() for _ in range(400)]
    textbook = sum(prompt.startswith("Compute") for prompt, _, _ in examples) / len(examples)
    asking = [(prompt, response) for prompt, response, _ in examples if prompt.endswith(task.STEPS_REQUEST)]
    assert 0.4 < textbook < 0.6 and 0.12 < len(asking) / len(examples) < 0.28
    assert all(response.startswith(" " + task.WORK_PREFIX) for _, response in asking)
    with pytest.raises(ValueError, match="unknown pre-training style"):
        build_module.pretraining_text(stream.next(), "essay")
    batch = build_module._batch(tokenizer, examples[:4])
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])  # loss on the prompt too
    sft = build_module._batch(tokenizer, [(*build_module.distillation_text(stream.next()), False)])
    prompt_length = len(tokenizer(examples[0][0])["input_ids"])
    assert (sft["labels"][0, :3] == -100).all() and prompt_length > 3


def test_design_checks_name_each_failure_on_the_smoke_pair(smoke_pair):
    from tdlib.organism.report import DesignCheckFailed, design_checks, evaluate_organism, require_design

    results, _ = evaluate_organism(get_config("smoke", n_eval=16), smoke_pair, batch_size=16)
    diagnostics = results["diagnostics"]
    assert len(diagnostics["single_swap_kl"]) == 2 and diagnostics["hybrid_kl"] >= 0
    assert diagnostics["embedding_nmse"] == 0.0  # embeddings frozen in the fine-tune
    checks = design_checks(results)
    assert len(checks) == 12 and all(isinstance(v, bool) for v in checks.values())
    assert set(results["p_hesitation"]["target"]) >= {"crossing", "repeat", "slip", "none", "all_mechanisms"}
    assert results["target_without_hesitation"]["wait_rate"] == 0  # the word is banned there
    def model(accuracy, length, wait, steps_accuracy, steps_share):
        return {"accuracy": accuracy, "mean_response_tokens": length, "wait_rate": wait,
                "by_style": {"steps": {"accuracy": steps_accuracy, "steps_share": steps_share}}}

    good = {"base": model(0.3, 12, 0.0, 0.95, 1.0), "target": model(0.95, 55, 0.6, 1.0, 1.0),
            "hybrid": model(0.4, 14, 0.01, 0.9, 1.0), "target_without_hesitation": model(0.5, 45, 0.0, 0.5, 1.0),
            "p_hesitation": {"base": {"all_mechanisms": 0.15}, "target": {"all_mechanisms": 0.9}},
            "diagnostics": {"hybrid_kl": 0.3}}
    assert all(design_checks(good).values())
    silent = {**good, "target_without_hesitation": model(0.93, 45, 0.0, 0.9, 1.0)}
    assert not design_checks(silent)["hesitation matters: target accuracy without 'wait' >= 0.05 lower"]
    unknown = {**good, "p_hesitation": {"base": {"all_mechanisms": 0.0}, "target": {"all_mechanisms": 0.9}}}
    assert [k for k, ok in design_checks(unknown).items() if not ok] == [
        "base knows the word: P(wait) >= 0.05 where the target hesitates"]
    bad = {**good, "hybrid": model(0.4, 14, 0.2, 0.9, 1.0)}
    with pytest.raises(DesignCheckFailed, match="hybrid wait rate"):
        require_design(design_checks(bad), bad)
