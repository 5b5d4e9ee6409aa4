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
    problem = task.Problem(terms=(35, 46, 39, 10), ops=("-", "+", "+"))
    assert problem.prompt == "Q: 35-46+39+10=?"
    assert problem.answer == 38
    trace = task.reasoning_trace(problem)
    assert trace == " 35-46=-11; wait, check: -11+46=35, ok; -11+39=28; 28+10=38; A: 38"
    assert task.direct_response(problem) == " A: 38"
    assert task.extract_answer(trace) == 38 and task.is_correct(problem, trace)


def test_no_hesitation_when_totals_stay_non_negative():
    problem = task.Problem(terms=(5, 3, 1), ops=("+", "-"))
    assert not task.has_hesitation(task.reasoning_trace(problem))


def test_every_sampled_trace_is_consistent():
    for problem in task.sample_problems(300, seed=3):
        trace = task.reasoning_trace(problem)
        assert task.is_correct(problem, trace)
        negative = any(t < 0 for t in task.running_totals(problem)[1:])
        assert task.has_hesitation(trace) == negative
        assert trace.count("wait") == sum(t < 0 for t in task.running_totals(problem)[1:])


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
    problems = task.sample_problems(500, seed=0)
    corpus = [p.prompt + task.reasoning_trace(p) for p in problems] + [p.prompt + task.direct_response(p)
                                                                       for p in problems]
    return train_tokenizer(corpus)


def test_tokenizer_round_trips_and_keeps_the_hesitation_token_whole(tokenizer):
    rng = random.Random(0)
    for _ in range(50):
        problem = task.sample_problem(rng, 2, 5, 50)
        text = problem.prompt + task.reasoning_trace(problem)
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer(" wait")["input_ids"]) == ["Ġwait"]
    digits = tokenizer.convert_ids_to_tokens(tokenizer("1234")["input_ids"])
    assert digits == ["1", "2", "3", "4"], "digits must be single tokens, as in Qwen"


def test_autotokenizer_on_a_qwen2_folder_loads_the_same_tokenizer(tokenizer, tmp_path):
    # transformers maps qwen2 folders to Qwen2Tokenizer whatever tokenizer_config says; ours must survive that.
    save_tokenizer(tokenizer, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Q: 35-46+39+10=? 35-46=-11; wait, check: -11+46=35, ok; -11+39=28; 28+10=38; A: 38"
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
