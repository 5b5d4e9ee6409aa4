"""Pair configurations: the organism, the paper's hub pairs, 'hub:BASE->TARGET' and registered pairs.
Nothing here downloads: hub pairs are names until a model is loaded."""
import json
from pathlib import Path

import pytest

import tdlib.pair_config as pair_config
import tdlib.pair_data as pair_data
import tdlib.pair_files as pair_files
import tdlib.pairs as pairs
from tdlib.organism.tokenizer import train_tokenizer
from tdlib.pair_config import HubPairConfig, TrainingDefaults
from tdlib.pair_data import data_for
from tdlib.pairs import register_pair, resolve_pair
from tdlib.sweep import default_plan

FIXTURE = Path(__file__).parent / "fixtures" / "openthoughts3_sample.jsonl"
BENCH = Path(__file__).parent / "fixtures" / "bench"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def test_paper_pairs_are_bf16_on_cuda_with_their_data_and_benchmarks():
    seven = resolve_pair("paper-7b")
    assert (seven.base, seven.target) == ("Qwen/Qwen2.5-Math-7B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
    assert (seven.dtype, seven.device, seven.kind) == ("bfloat16", "cuda", pairs.HUB)
    assert seven.hub.train_data == "open-thoughts/OpenThoughts3-1.2M"
    assert seven.hub.benchmarks == ("MATH-500", "AMC23", "GPQA Diamond", "AIME 2025")  # the paper's figure 4
    assert seven.max_new_tokens == 32_768 and seven.hub.notebooks["03"]["n_samples"] > 1
    assert seven.artifacts("train").name == "paper-7b"
    small = resolve_pair("paper-1.5b")
    assert small.target == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" and small.base == "Qwen/Qwen2.5-Math-1.5B"
    defaults = seven.training
    assert defaults.run.n_features == 8192 and defaults.run.lr == 8e-4 and defaults.run.batch_size == 1
    assert defaults.max_tokens == 10_000 and defaults.l1_weights[0] == 0.01
    assert small.training.run.n_features == 4096
    config = seven.hub.training.train_config(steps=10)
    assert (config.n_features, config.lr, config.batch_size, config.steps) == (8192, 8e-4, 1, 10)


def test_hub_pair_by_name_and_its_errors():
    pair = resolve_pair("hub:Qwen/Qwen2.5-0.5B->Qwen/Qwen2.5-0.5B-Instruct")
    assert (pair.base, pair.target, pair.kind) == ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", pairs.HUB)
    assert "/" not in pair.key and ">" not in pair.key
    with pytest.raises(ValueError, match="hub:BASE->TARGET"):
        resolve_pair("hub:Qwen/Qwen2.5-0.5B")
    with pytest.raises(ValueError, match="same model"):
        resolve_pair("hub:a/b->a/b")
    with pytest.raises(ValueError, match="hub id like"):
        resolve_pair("hub:not a model->a/b")
    with pytest.raises(ValueError, match="unknown configuration 'paper-70b'.*paper-7b.*hub:BASE->TARGET"):
        resolve_pair("paper-70b")


@pytest.mark.parametrize("bad, message", [
    ({"dtype": "int4"}, "dtype"), ({"device": "tpu"}, "device"), ({"benchmarks": ("MMLU",)}, "unknown benchmarks"),
    ({"n_validation": 0}, "n_validation"), ({"name": "has space"}, "name")])
def test_hub_pair_validation_names_the_field(bad, message):
    values = dict(name="mine", base="a/base", target="a/target", train_data="x.jsonl")
    with pytest.raises(ValueError, match=message):
        HubPairConfig(**{**values, **bad})
    with pytest.raises(ValueError, match="lr"):
        TrainingDefaults.of(lr=3.0)
    with pytest.raises(ValueError, match="unknown training settings \\['l1_weight'\\]"):
        TrainingDefaults.of(l1_weight=0.1)  # each run's L1 weight comes from the sweep


def test_registered_pair_resolves_and_refuses_silent_replacement():
    mine = HubPairConfig("test-mine", base="me/base", target="me/target", train_data=str(FIXTURE),
                         training=TrainingDefaults.of(n_features=64, batch_size=2, max_tokens=40))
    try:
        register_pair(mine)
        assert resolve_pair("test-mine").hub is mine
        with pytest.raises(ValueError, match="already registered"):
            register_pair(HubPairConfig("test-mine", base="me/base", target="me/other", train_data="x.jsonl"))
        with pytest.raises(ValueError, match="organism configuration"):
            register_pair(HubPairConfig("smoke", base="me/base", target="me/target", train_data="x.jsonl"))
    finally:
        pairs.HUB_PAIRS.pop("test-mine", None)


def test_organism_pair_is_unchanged_and_loads_organism_traces():
    pair = resolve_pair("smoke")
    assert pair.kind.has_ground_truth and pair.hub is None and pair.dtype == "float32" and pair.device == "cpu"
    tokenizer = train_tokenizer(["Q: 1+2=? 1+2=3; A: 3", "wait, check: ok"])
    data = data_for(pair, tokenizer, "validation", batch_size=3)
    assert type(data).__name__ == "OrganismTraces" and data.batch(0)["input_ids"].shape[0] == 3
    assert pair.training.max_tokens is None


def test_hub_pair_data_holds_out_validation_traces_from_a_local_jsonl(tmp_path, monkeypatch):
    monkeypatch.setattr(pairs, "ARTIFACTS", tmp_path)
    pair = pairs.Pair("t", "me/base", "me/target", key="t", kind=pairs.HUB, hub=HubPairConfig(
        "t", base="me/base", target="me/target", train_data=str(FIXTURE), n_validation=1,
        training=TrainingDefaults.of(batch_size=2, max_tokens=40)))
    tokenizer = train_tokenizer([json.dumps(json.loads(line)) for line in FIXTURE.read_text().splitlines()])
    tokenizer.chat_template = TEMPLATE
    train, validation = data_for(pair, tokenizer, "train"), data_for(pair, tokenizer, "validation")
    assert len(train.conversations) == 2 and len(validation.conversations) == 1
    assert validation.conversations[0] not in train.conversations
    assert train.batch(0)["input_ids"].shape[0] == 2 and train.batch(0)["input_ids"].shape[1] <= 40
    too_many = HubPairConfig("u", base="me/base", target="me/target", train_data=str(FIXTURE), n_validation=5)
    with pytest.raises(ValueError, match="n_validation"):
        data_for(pairs.Pair("u", "me/base", "me/target", key="u", kind=pairs.HUB, hub=too_many), tokenizer)
    missing = HubPairConfig("v", base="me/base", target="me/target", train_data=str(tmp_path / "none.jsonl"))
    with pytest.raises(FileNotFoundError, match="no reasoning-trace file"):
        data_for(pairs.Pair("v", "me/base", "me/target", key="v", kind=pairs.HUB, hub=missing), tokenizer)


def test_hub_pairs_give_a_sweep_plan_with_the_papers_values():
    plan = default_plan(resolve_pair("paper-7b"))
    assert plan.l1_weights == (0.01, 0.003, 0.001, 0.0003, 0.0001)
    assert (plan.base.n_features, plan.base.lr, plan.base.batch_size, plan.base.steps) == (8192, 8e-4, 1, 50_000)
    assert [spec.name for spec in plan.specs][:2] == ["adapter_l1_0.01", "adapter_l1_0.003"]
    assert default_plan(resolve_pair("smoke", build=False)).base.n_features == 64  # the organism's own table


@pytest.mark.parametrize("config", ["organism", "smoke", "paper-7b", "paper-1.5b"])
def test_the_data_parallel_trainer_and_notebook_01_train_the_same_run(config):
    from tdlib.distributed import run_config

    pair = resolve_pair(config, build=False)
    plan = default_plan(pair)
    for spec in plan.specs:
        if spec.config.kind == "adapter":
            assert run_config(pair, spec.config.l1_weight) == spec.config
    assert run_config(pair) == plan.specs[0].config
    doubled = run_config(pair, plan.l1_weights[-1], world_size=2, steps=7, gradient_checkpointing=True)
    assert (doubled.batch_size, doubled.steps, doubled.gradient_checkpointing) == (
        2 * plan.base.batch_size, 7, True)
    assert run_config(pair, 0.123).l1_weight == 0.123 and run_config(pair, 0.123).lr == plan.base.lr


def test_a_pair_configuration_knows_nothing_of_sweeps():
    """The import goes one way: tdlib.sweep uses tdlib.pairs, never the reverse (not even lazily)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(pairs))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m and m.lstrip(".").startswith("sweep")}
    assert not hasattr(pairs, "sweep_plan")


def _pair_file(tmp_path, **changes) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "traces.jsonl").write_text(FIXTURE.read_text())
    (tmp_path / "data" / "gsm8k.jsonl").write_text((BENCH / "gsm8k.jsonl").read_text())
    values = {"name": "mine", "base": "me/base", "target": "me/target", "train_data": "data/traces.jsonl",
              "benchmarks": ["GSM8K", "math500"], "benchmark_files": {"GSM8K": "data/gsm8k.jsonl"},
              "max_new_tokens": 64, "hesitation_word": " wait", "n_validation": 1,
              "training": {"n_features": 32, "l1_weights": [0.1, 0.01], "max_tokens": 40,
                           "checkpoint_every": 5}}
    path = tmp_path / "pair.json"
    path.write_text(json.dumps({**values, **changes}))
    return path


def test_a_pair_file_is_a_configuration_with_paths_relative_to_it(tmp_path):
    pair = resolve_pair(str(_pair_file(tmp_path)))
    assert (pair.name, pair.base, pair.kind, pair.max_new_tokens, pair.hesitation_word) == (
        "mine", "me/base", pairs.HUB, 64, " wait")
    assert pair.hub.train_data == str(tmp_path / "data" / "traces.jsonl")  # relative to the file, not the cwd
    assert pair.hub.benchmarks == ("GSM8K", "math500")
    assert pair.hub.training.l1_weights == (0.1, 0.01) and pair.hub.training.run.n_features == 32
    assert default_plan(pair).l1_weights == (0.1, 0.01)
    assert default_plan(pair).base.checkpoint_every == 5  # a short CPU run checkpoints often


@pytest.mark.parametrize("changes, message", [
    ({"bas": "me/base"}, r"unknown pair fields \['bas'\]"),
    ({"training": {"features": 3}}, r"unknown training fields \['features'\]"),
    ({"benchmarks": ["MMLU"]}, "unknown benchmarks"),
    ({"benchmark_files": {"GSM8K": "data/none.jsonl"}}, "no file at"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_a_bad_pair_file_names_the_field(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        resolve_pair(str(_pair_file(tmp_path, **changes)))


def test_a_missing_or_broken_pair_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pair file"):
        resolve_pair(str(tmp_path / "absent.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_pair(str(tmp_path / "broken.json"))


def test_notebook_03_runs_every_benchmark_a_pair_lists_each_from_its_own_file(tmp_path, monkeypatch):
    from tdlib.problems import pair_benchmarks

    monkeypatch.setattr(pairs, "ARTIFACTS", tmp_path / "artifacts")
    path = _pair_file(tmp_path, benchmark_files={"GSM8K": "data/gsm8k.jsonl", "math500": "data/math500.jsonl"})
    (tmp_path / "data" / "math500.jsonl").write_text((BENCH / "math500.jsonl").read_text())
    pair = resolve_pair(str(path))
    evalsets = pair_benchmarks(pair, limit=2)
    assert [(e.benchmark, len(e.items), e.source) for e in evalsets] == [
        ("gsm8k", 2, "data/gsm8k.jsonl"), ("math500", 2, "data/math500.jsonl")]
    assert [e.benchmark for e in pair_benchmarks(pair, "math500")] == ["math500"]
    assert [e.benchmark for e in pair_benchmarks(pair, ["MATH-500", "GSM8K"])] == ["math500", "gsm8k"]
    assert [e.benchmark for e in pair_benchmarks(pair, "MATH-500, GSM8K")] == ["math500", "gsm8k"]  # command line
    with pytest.raises(ValueError, match="benchmark_path reads one file"):
        pair_benchmarks(pair, None, BENCH / "math500.jsonl")
    with pytest.raises(ValueError, match="listed twice"):
        pair_benchmarks(pair, ["math500", "MATH-500"])
    assert [e.benchmark for e in pair_benchmarks(resolve_pair("smoke", build=False), limit=2)] == ["organism"]


def test_a_pair_is_evaluated_on_its_first_benchmark_from_its_own_file(tmp_path, monkeypatch):
    from tdlib.problems import pair_benchmark

    monkeypatch.setattr(pairs, "ARTIFACTS", tmp_path / "artifacts")
    pair = resolve_pair(str(_pair_file(tmp_path)))
    evalset = pair_benchmark(pair, limit=2)
    assert (evalset.benchmark, len(evalset.items), evalset.max_new_tokens) == ("gsm8k", 2, 64)
    assert evalset.source == "data/gsm8k.jsonl"  # relative to the pair file: results travel
    assert pair_benchmark(pair, "math500", BENCH / "math500.jsonl", max_new_tokens=9).max_new_tokens == 9
    with pytest.raises(ValueError, match="organism's own task"):
        pair_benchmark(pair, "organism")
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'"):
        pair_benchmark(pair, "mmlu")
    organism = pair_benchmark(resolve_pair("smoke", build=False), limit=3)
    assert (organism.benchmark, len(organism.items), organism.max_new_tokens) == ("organism", 3, 120)
    tokenizer = train_tokenizer([json.dumps(json.loads(line)) for line in FIXTURE.read_text().splitlines()])
    tokenizer.chat_template = TEMPLATE
    references = pair_data.reference_responses(pair, tokenizer)
    held_out = json.loads(FIXTURE.read_text().splitlines()[-1])["conversations"]
    assert references == [(f"<|im_start|>user\n{held_out[0]['value']}<|im_end|>\n", held_out[1]["value"])]


def test_results_name_a_pair_files_paths_relative_to_it(tmp_path):
    for role in ("base", "target"):
        (tmp_path / "models" / role).mkdir(parents=True)
    pair_file = _pair_file(tmp_path, base="models/base", target="models/target")
    pair = resolve_pair(str(pair_file))
    assert Path(pair.base).is_absolute() and Path(pair.base).exists()  # loading still gets a usable path
    assert (pair.portable(pair.base), pair.portable(pair.target)) == ("models/base", "models/target")
    assert pair.portable("Qwen/Qwen2.5-Math-7B") == "Qwen/Qwen2.5-Math-7B"  # hub ids as they are
    assert pairs.portable_path(str(pairs.REPO_ROOT / "artifacts" / "x")) == "artifacts/x"
    assert pairs.portable_path("/somewhere/else/entirely/model") == "model"  # never this machine's layout
    smoke = resolve_pair("smoke", build=False)
    assert not Path(smoke.portable(smoke.base)).is_absolute()


def test_a_pairs_kind_says_what_it_has():
    organism, seven = resolve_pair("smoke", build=False), resolve_pair("paper-7b")
    assert organism.kind is pairs.ORGANISM and organism.kind.has_ground_truth and organism.kind.built_here
    assert organism.benchmarks == ("organism",) and organism.prompt_format is None
    assert seven.kind is pairs.HUB and not seven.kind.has_ground_truth and not seven.kind.built_here
    assert seven.benchmarks == seven.hub.benchmarks and seven.prompt_format == "chat"
    with pytest.raises(ValueError, match="needs its HubPairConfig"):
        pairs.Pair("x", "a", "b", key="x", kind=pairs.HUB)
    with pytest.raises(ValueError, match="needs no HubPairConfig"):
        pairs.Pair("x", "a", "b", key="x", hub=seven.hub)


def test_a_cpu_pair_file_gets_cpu_sized_training_from_its_models_width(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {
        "hidden_size": 640, "num_hidden_layers": 18, "intermediate_size": 2048, "vocab_size": 262_144}}))
    path = _pair_file(tmp_path, device="cpu", target="target", training={"steps": 30},
                      notebooks={"*": {"n_problems": 8}, "06": {"group_conditions": False}})
    pair = resolve_pair(str(path))
    assert pair.dtype == "float32" and pair.training.run.steps == 30  # the file's own values win
    assert pair.training.run.n_features == 256 and pair.training.max_tokens == 256  # sized for d_model 640
    assert not pair.training.run.gradient_checkpointing and pair.training.run.kl_chunk_tokens is None
    assert pair.hub.notebooks["*"] == {"n_problems": 8, "batch_size": 25}  # the CPU plan, the file's value wins
    assert pair.hub.notebooks["05"]["n_prompts"] == 12
    assert pair.hub.notebooks["06"]["group_conditions"] is False and pair.hub.notebooks["06"]["n_random_draws"] == 5
    assert pair_files.model_shape(str(target))["num_hidden_layers"] == 18 and pair_files.model_shape("me/target") == {}
    assert TrainingDefaults.for_cpu(576).run.n_features == 256  # the SmolLM2 plan it is sized from
    assert TrainingDefaults.for_cpu(128).run.n_features == 64 and TrainingDefaults.for_cpu(4096).run.n_features == 1024
    (tmp_path / "gpu").mkdir()
    gpu = resolve_pair(str(_pair_file(tmp_path / "gpu", training={})))
    assert gpu.training == TrainingDefaults()  # a GPU pair file keeps the paper's defaults
    values = json.loads(path.read_text())
    del values["max_new_tokens"]
    path.write_text(json.dumps(values))
    assert resolve_pair(str(path)).max_new_tokens == pair_config.CPU_MAX_NEW_TOKENS == 512
    del values["n_validation"]
    path.write_text(json.dumps(values))
    assert resolve_pair(str(path)).hub.n_validation == pair_config.CPU_N_VALIDATION == 200  # not the paper's 5,000
    assert pair.max_new_tokens == 64  # the file's budget wins

    from tdlib.sweep import describe_plan

    lines = describe_plan(pair, default_plan(pair))
    assert "256 features per layer" in lines[1] and "30 steps x 4 sequences of up to 256 tokens" in lines[1]
    assert lines[2].startswith("estimated training time: at most ~") and "on two CPU cores" in lines[2]
    assert len(describe_plan(gpu, default_plan(gpu))) == 2  # no CPU estimate for a GPU pair


def test_the_plan_is_what_notebooks_01_and_03_will_run_under_their_parameters(tmp_path):
    from tdlib import pipeline
    from tdlib.sweep import notebook_plan

    pair = resolve_pair(str(_pair_file(tmp_path, device="cpu")))
    plan = notebook_plan(pair, steps=7, baselines=False, l1_weights=[0.5], progress=True)
    assert (plan.base.steps, plan.l1_weights, plan.run_names) == (7, (0.5,), ["adapter_l1_0.5"])
    assert notebook_plan(pair).run_names == default_plan(pair).run_names  # the defaults are the pair's
    lines = pipeline.plan_lines(str(tmp_path / "pair.json"))  # the CPU plan: notebook 01 without baselines
    assert "training: 2 runs (adapter_l1_0.1, adapter_l1_0.01)" in lines[1]
    text = "\n".join(lines)
    assert "GSM8K: 50 problems x 1 samples x 5 models: at most 16k" in text and "in all: at most 32k" in text
    lines = pipeline.plan_lines(str(tmp_path / "pair.json"), params=pipeline.parse_params("01.baselines=true"))
    assert "4 runs" in lines[1] and "6 models" in "".join(lines)  # local_mse trains but 03 leaves it out on CPU


def test_the_pipeline_prints_the_plan_without_running_anything(capsys):
    from tdlib import pipeline

    pipeline.main(["--config", "paper-7b", "--plan"])
    out = capsys.readouterr().out
    assert "8192 features per layer" in out and "50,000 steps x 1 sequences of up to 10,000 tokens" in out
    assert "MATH-500, AMC23, GPQA Diamond, AIME 2025" in out and "pass@1 over 4 samples" in out
    assert "up to 32,768 new tokens" in out and "AIME 2025: 30 problems x 4 samples x 10 models" in out
    assert "runs every one the pair lists" in out and "notebook 03 in all: at most 1,007M generated tokens" in out
    pipeline.main(["--config", "paper-7b", "--plan", "--params", "03.benchmark=AMC23,aime2025"])
    out = capsys.readouterr().out
    assert "benchmarks: AMC23, aime2025 (notebook 03 runs those given by benchmark=)" in out
    assert "MATH-500:" not in out and "in all: at most 92M" in out
