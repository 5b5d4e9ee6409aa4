"""The sweep of one (base, target) pair, what notebook 01 calls: which runs to train (``SweepPlan``,
``default_plan``), training each (``train_run``: trains, loads when finished, resumes when interrupted; run folders
and ``load_named`` are ``tdlib.runs``), the local-MSE transcoder's calibration, held-out evaluation and the choice
of the analysis adapter (``analysis_models``, ``study_model``).
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from safetensors.torch import save_file

from .faithfulness import HELDOUT_TEXT, evaluate_replacement, scored_positions_description
from .models import load_tokenizer
from .pair_data import data_for
from .pair_files import model_shape
from .pairs import Pair
from .paper import reported
from .results import atomic_write_text, read_results
from .runs import (BASE_MLPS_FILE, DamagedRunError, checkpoint_is_stale, load_named, read_run, run_dir,
                   spliced_target, train_root, write_run_info)
from .splice import attach_adapters, get_mlp_choice, set_mlp_choice, spliced_mlps
from .train import TrainConfig, TrainResult, config_from_dict, new_adapters, run_dead_features, train, training_identity

LOCAL_MSE = "local_mse"
CALIBRATION_FILE = "local_mse_calibration.json"
L0_RANGE = (1.0, 10.0)
"""The paper's range of active features per token per layer (its adapters: about 1 to 10); the analysis model is
chosen inside it (``analysis_models``)."""


@dataclass(frozen=True)
class RunSpec:
    """One model of the sweep: a name and its training config."""

    name: str
    config: TrainConfig


def adapter_run_name(l1_weight: float) -> str:
    return f"adapter_l1_{l1_weight:g}"


def _shared(base: TrainConfig) -> dict:
    return {k: v for k, v in asdict(base).items() if k not in ("kind", "l1_weight")}


def sweep_specs(l1_weights, base: TrainConfig, baselines: bool = True) -> list[RunSpec]:
    """Adapters at each ``l1_weight`` plus (``baselines``) the dense MLP fine-tune skyline, all sharing ``base``'s
    data budget (steps, batch size, seed). The local-MSE transcoder is not here: its L1 weight is calibrated after
    the adapters are trained (``calibrate_local_mse``, run by ``run_sweep``)."""
    l1_weights = sorted(l1_weights, reverse=True)
    if not l1_weights:
        raise ValueError("the sweep needs at least one l1_weight")
    shared = _shared(base)
    specs = [RunSpec(adapter_run_name(w), TrainConfig(kind="adapter", l1_weight=w, **shared)) for w in l1_weights]
    if baselines:
        specs.append(RunSpec("mlp_finetune", TrainConfig(kind="mlp_finetune", l1_weight=0.0, **shared)))
    return specs


def local_mse_spec(base: TrainConfig, l1_weight: float) -> RunSpec:
    """The local-MSE transcoder with ``base``'s data budget at ``l1_weight``."""
    return RunSpec(LOCAL_MSE, TrainConfig(kind="local_mse", l1_weight=l1_weight, **_shared(base)))


def train_run(pair: Pair, spec: RunSpec, data, root: Path | None = None, progress: bool = True):
    """Train (or load when finished, or resume when interrupted) one run; returns (spliced model, TrainResult or
    None when loaded). A finished run whose config differs from ``spec`` is stale and trained again; fields that
    only change memory (``tdlib.train.MEMORY_FIELDS``) do not count."""
    directory = run_dir(pair, spec.name, root)
    try:
        finished = read_run(directory)
        if finished is not None and training_identity(finished["train_config"]) == training_identity(spec.config):
            return load_named(pair, spec.name, root), None
        stale = finished is not None or checkpoint_is_stale(directory, spec.config)
    except DamagedRunError as error:
        print(f"[sweep] {spec.name}: {error}. Training it again")
        stale = True
    if stale:
        print(f"[sweep] {spec.name}: {directory} holds a different or damaged run; training it again")
        shutil.rmtree(directory)
    adapters = None
    model = spliced_target(pair)
    if spec.config.kind != "mlp_finetune":
        adapters = new_adapters(model, spec.config, meta={"run": spec.name, "train_config": asdict(spec.config)})
        attach_adapters(model, adapters)
    started = time.time()
    result: TrainResult = train(model, data, spec.config, directory, progress=progress)
    if adapters is not None:
        adapters.save(directory / "adapters")
    else:
        state = {f"{i}.{name}": p.detach().cpu().contiguous()
                 for i, mlp in enumerate(spliced_mlps(model)) for name, p in mlp.base_mlp.state_dict().items()}
        save_file(state, directory / BASE_MLPS_FILE)
    write_run_info(directory, pair, spec.name, spec.config, result, time.time() - started)
    # finished: later notebooks need the weights and run.json, not the optimiser state (2x the weights, in fp32)
    (directory / "checkpoint.pt").unlink(missing_ok=True)
    set_mlp_choice(model, spec.config.replacement)
    return model, result


def seed_variant(pair: Pair, name: str, seed: int, root: Path | None = None, progress: bool = True):
    """Train (or load) run ``name`` again with another ``seed`` (initialisation and data order), every other setting
    kept: ``(run name, model)``. The stability check of the feature selection compares the two."""
    info = read_run(run_dir(pair, name, root))
    if info is None:
        raise FileNotFoundError(f"no finished run {name!r} to retrain with seed {seed}; run notebook 01 first")
    config = replace(config_from_dict(info["train_config"]), seed=seed)
    if seed == config_from_dict(info["train_config"]).seed:
        raise ValueError(f"run {name!r} already uses seed {seed}; pick another seed for the stability check")
    spec = RunSpec(f"{name}_seed{seed}", config)
    data = data_for(pair, load_tokenizer(pair.target), batch_size=config.batch_size, seed=seed)
    model, _ = train_run(pair, spec, data, root=root, progress=progress)
    return spec.name, model.eval()


# --------------------------------------------------------------------------------------------- the sweep

@dataclass(frozen=True)
class SweepPlan:
    """What notebook 01 trains for one pair: adapters at several sparsities plus the two trained baselines."""

    l1_weights: tuple[float, ...]
    """The sparsity knob; one adapter per value."""
    base: TrainConfig
    """Shared settings (features, steps, batch size, lr, loss weights, seed) of every run."""
    n_validation_batches: int = 8
    """Held-out batches (of ``base.batch_size`` sequences) for the final metrics."""
    baselines: bool = True
    """Also train the dense MLP fine-tune skyline and the local-MSE transcoder. The skyline trains every base MLP
    (5.7e9 parameters on the 7B pair: 68 GB of fp32 gradients and AdamW states), so a one-GPU 7B run sets False."""
    calibration_steps: int | None = None
    """Steps of each short local-MSE trial run that calibrates its L1 weight (``calibrate_local_mse``); None: a
    fifth of ``base.steps``."""
    calibration_trials: int = 5
    """Short local-MSE trial runs at most in that calibration (the cost: about trials x calibration_steps local-MSE
    steps, one full local-MSE run at the defaults; cached, so a rerun of notebook 01 does not repeat it)."""

    def __post_init__(self):
        if not self.l1_weights or any(w <= 0 for w in self.l1_weights):
            raise ValueError(f"SweepPlan.l1_weights must be positive values, got {self.l1_weights}")
        if self.n_validation_batches < 1:
            raise ValueError("SweepPlan.n_validation_batches must be >= 1")
        if self.calibration_steps is not None and self.calibration_steps < 1:
            raise ValueError(f"SweepPlan.calibration_steps must be None or >= 1, got {self.calibration_steps}")
        if self.calibration_trials < 1:
            raise ValueError(f"SweepPlan.calibration_trials must be >= 1, got {self.calibration_trials}")

    @property
    def specs(self) -> list[RunSpec]:
        """The runs trained from the plan alone: the adapters and (``baselines``) the skyline."""
        return sweep_specs(self.l1_weights, self.base, self.baselines)

    @property
    def run_names(self) -> list[str]:
        """Every run ``run_sweep`` leaves behind: ``specs`` plus the calibrated local-MSE transcoder."""
        return [spec.name for spec in self.specs] + ([LOCAL_MSE] if self.baselines else [])

    @property
    def trial_steps(self) -> int:
        return self.calibration_steps or max(1, self.base.steps // 5)


def default_plan(pair: Pair, n_validation_batches: int | None = None) -> SweepPlan:
    """The sweep notebook 01 trains for ``pair``, from its training defaults (``pair.training``: the organism's
    measured table ``tdlib.pair_config.ORGANISM_TRAINING``, or a hub pair's, the paper's unless its pair file says
    otherwise)."""
    training = pair.training
    return SweepPlan(l1_weights=tuple(training.l1_weights), base=training.train_config(),
                     n_validation_batches=n_validation_batches or training.n_validation_batches)


def notebook_plan(pair: Pair, *, l1_weights=None, steps: int | None = None, n_features: int | None = None,
                  n_validation_batches: int | None = None, baselines: bool = True,
                  lambda_bridge: float | None = None, placement: str | None = None, **unused) -> SweepPlan:
    """The sweep notebook 01 trains under its parameters (None: the pair's default), so that ``make plan`` prints
    what the notebook will run; ``unused``: notebook 01's other parameters."""
    plan = default_plan(pair)
    overrides = {k: v for k, v in dict(steps=steps, n_features=n_features, lambda_bridge=lambda_bridge,
                                       placement=placement).items() if v is not None}
    return replace(plan, base=replace(plan.base, **overrides),
                   l1_weights=tuple(l1_weights) if l1_weights else plan.l1_weights, baselines=baselines,
                   n_validation_batches=n_validation_batches or plan.n_validation_batches)


CPU_SECONDS_PER_TOKEN_PARAMETER = 6.5 / (460 * 134.5e6)
"""Adapter training cost on two CPU cores, measured on SmolLM2-135M (134.5M parameters): 6.5 s per step of 4
traces, ~460 tokens (docs/real_models.md, "SmolLM2"). Scaled by tokens x parameters it gives a rough estimate for
another CPU pair of that size class; overheads dominate far below it."""


def describe_plan(pair: Pair, plan: SweepPlan) -> list[str]:
    """What notebook 01 will train, as printed when a run starts (``python -m tdlib.pipeline --plan``)."""
    training, base = pair.training, plan.base
    runs = plan.run_names
    cap = training.max_tokens
    tokens = base.steps * base.batch_size * cap if cap else None
    lines = [f"pair {pair.name} ({pair.kind.name}): {pair.target} on {pair.device}, {pair.dtype}",
             f"training: {len(runs)} runs ({', '.join(runs)}), {base.n_features} features per layer, "
             f"{base.steps:,} steps x {base.batch_size} sequences"
             + (f" of up to {cap:,} tokens ({tokens:,} tokens per run at most)" if cap else "")
             + f", lr {base.lr:g}, L1 weights {', '.join(f'{w:g}' for w in plan.l1_weights)}"
             + (f", adapters at the {base.placement!r} placement" if base.placement else "")]
    shape = model_shape(pair.target) if pair.hub is not None else {}
    if pair.device == "cpu" and tokens and {"hidden_size", "num_hidden_layers", "vocab_size"} <= set(shape):
        d, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
        parameters = layers * (4 * d * d + 3 * d * shape.get("intermediate_size", 4 * d)) + vocab * d
        hours = len(runs) * tokens * parameters * CPU_SECONDS_PER_TOKEN_PARAMETER / 3600
        lines.append(f"estimated training time: at most ~{hours:.1f} h on two CPU cores ({parameters / 1e6:.0f}M "
                     "parameters, at the rate measured on SmolLM2-135M, every sequence at the cap; shorter sequences "
                     "cost proportionally less)")
    return lines


def validation_batches(pair: Pair, plan: SweepPlan, tokenizer) -> list[dict]:
    """The held-out batches every held-out number of the sweep uses (a separate seed stream from training)."""
    validation = data_for(pair, tokenizer, "validation", batch_size=plan.base.batch_size, seed=plan.base.seed)
    return [validation.batch(i) for i in range(plan.n_validation_batches)]


def run_sweep(pair: Pair, plan: SweepPlan, data, batches: list[dict] | None = None, progress: bool = True,
              root: Path | None = None) -> dict[str, object]:
    """Train (or load) every run of ``plan``; returns {name: TrainResult or None when loaded from disk}.

    First the adapters and the skyline; then, with ``plan.baselines``, the local-MSE transcoder at the L1 weight
    whose L0 matches the analysis adapter's (``calibrate_local_mse`` on the held-out ``batches``; None: the pair's
    ``validation_batches``, read with ``data.tokenizer``)."""
    results = {}
    for spec in plan.specs:
        _, results[spec.name] = train_run(pair, spec, data, root=root, progress=progress)
    if plan.baselines:
        if batches is None:
            batches = validation_batches(pair, plan, data.tokenizer)
        calibration = calibrate_local_mse(pair, plan, data, batches, root=root, progress=progress)
        spec = local_mse_spec(plan.base, calibration["l1_weight"])
        _, results[spec.name] = train_run(pair, spec, data, root=root, progress=progress)
    return results


# ----------------------------------------------------------------------------- the local-MSE transcoder's L1

def calibrate_local_mse(pair: Pair, plan: SweepPlan, data, batches: list[dict], root: Path | None = None,
                        progress: bool = True) -> dict:
    """The local-MSE transcoder's L1 weight, chosen so its L0 matches the analysis adapter's (a fair baseline
    compares at equal sparsity). Cheap by design, and cached in ``<train root>/local_mse_calibration.json``:

    1. the trained adapters' held-out KL and L0 on ``batches`` pick the analysis adapter (``analysis_models``);
       its L0 is the target;
    2. short local-MSE runs (``plan.trial_steps`` steps each, the full run's settings otherwise, at most
       ``plan.calibration_trials``) start at the analysis adapter's L1 weight, step by 10x until the target L0 is
       bracketed, then bisect in log space; each trial's L0 is measured as the sweep measures every model's (the
       spliced model on ``batches``);
    3. the trial whose L0 is nearest the target on a log scale gives the weight.

    A short run's L0 is not exactly the full run's, so the full run's L0 is reported beside the target (notebook
    01), not assumed. Returns {"l1_weight", "target_l0", "matched_to", "trials": [{"l1_weight", "l0"}], ...}."""
    path = Path(root or train_root(pair)) / CALIBRATION_FILE
    key = {"adapters": [training_identity(s.config) for s in plan.specs if s.config.kind == "adapter"],
           "local_mse": training_identity(local_mse_spec(plan.base, 0.0).config), "trial_steps": plan.trial_steps,
           "trials": plan.calibration_trials, "n_validation_batches": len(batches)}
    cached = _read_calibration(path)
    if cached is not None and cached.get("key") == key:
        return cached
    adapters = [s.name for s in plan.specs if s.config.kind == "adapter"]
    summary = {name: _held_out_summary(pair, name, batches, root) for name in adapters}
    chosen = analysis_models(summary)["analysis_model"]
    target = summary[chosen]["l0"]
    trials = _search_l1(pair, plan, data, batches, target, start=summary[chosen]["l1_weight"], progress=progress)
    best = min(trials, key=lambda t: (abs(_log_l0(t["l0"]) - _log_l0(target)), t["l1_weight"]))
    result = {"l1_weight": best["l1_weight"], "target_l0": target, "matched_to": chosen,
              "trial_l0": best["l0"], "trial_steps": plan.trial_steps, "trials": trials,
              "rule": "L1 weight whose short-run L0 is nearest (log scale) the analysis adapter's held-out L0",
              "key": key}
    atomic_write_text(path, json.dumps(result, indent=2))
    return result


def local_mse_calibration(pair: Pair, root: Path | None = None) -> dict | None:
    """The last calibration ``calibrate_local_mse`` wrote for this pair (None if none), for the results file."""
    cached = _read_calibration(Path(root or train_root(pair)) / CALIBRATION_FILE)
    return {k: v for k, v in cached.items() if k != "key"} if cached else None


def _read_calibration(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:  # a damaged cache is only a cache: calibrate again
        return None


def _log_l0(l0: float) -> float:
    return math.log(max(l0, 1e-3))


def _held_out_summary(pair: Pair, name: str, batches: list[dict], root: Path | None) -> dict:
    metrics = evaluate_replacement(load_named(pair, name, root), batches, "adapter")
    info = read_run(run_dir(pair, name, root))
    return {"kind": info["kind"], "l1_weight": info["train_config"]["l1_weight"], "l0": metrics["l0"],
            "kl": metrics["kl"]}


def search_l1(measure, target: float, start: float, trials: int) -> list[dict]:
    """Weights tried and their L0, ``measure(weight) -> L0`` (L0 falls as the weight rises): x10 steps from
    ``start`` until ``target`` is bracketed, then geometric bisection, ``trials`` measurements in all."""
    tried: list[dict] = []
    above = below = None  # the largest weight whose L0 stayed above the target, the smallest one at or below it
    weight = start
    for _ in range(trials):
        l0 = measure(weight)
        tried.append({"l1_weight": weight, "l0": l0})
        if l0 > target:
            above = weight if above is None else max(above, weight)
        else:
            below = weight if below is None else min(below, weight)
        if above is not None and below is not None:
            weight = math.sqrt(above * below)
        else:
            weight = weight * 10 if below is None else weight / 10
    return tried


def _search_l1(pair: Pair, plan: SweepPlan, data, batches, target: float, start: float, progress: bool) -> list[dict]:
    """``search_l1`` with short local-MSE runs (``plan.trial_steps`` steps) measured on the held-out ``batches``."""
    model = spliced_target(pair)

    def measure(weight: float) -> float:
        config = replace(local_mse_spec(plan.base, weight).config, steps=plan.trial_steps,
                         checkpoint_every=plan.trial_steps)
        attach_adapters(model, new_adapters(model, config))
        with tempfile.TemporaryDirectory(prefix=".local_mse_trial.") as scratch:
            train(model, data, config, scratch, progress=False)
        l0 = evaluate_replacement(model, batches, "adapter")["l0"]
        if progress:
            print(f"[sweep] local_mse calibration: l1 {weight:.3g} -> L0 {l0:.2f} (target {target:.2f})")
        return l0

    return search_l1(measure, target, start, plan.calibration_trials)


def evaluate_sweep(pair: Pair, names: list[str], batches: list[dict], root: Path | None = None) -> dict[str, dict]:
    """Held-out metrics for the hybrid and every named run, in the 01_train.json ``models`` schema."""
    models = {}
    for name in ["hybrid", *names]:
        model = load_named(pair, name, root)
        choice = get_mlp_choice(model)[0]
        metrics = evaluate_replacement(model, batches, choice)
        info = read_run(run_dir(pair, name, root)) if name != "hybrid" else None
        config = info["train_config"] if info else None
        dead = run_dead_features(run_dir(pair, name, root), info) if info else {}
        models[name] = {
            "kind": config["kind"] if config else "hybrid",
            "l1_weight": config["l1_weight"] if config and config["kind"] != "mlp_finetune" else None,
            "l0": metrics.get("l0"),
            "kl": metrics["kl"],
            "top1_error": metrics["top1_error"],
            "nmse_layers": metrics["nmse_layers"],
            "nmse_with_embedding": metrics["nmse_with_embedding"],
            "dead_fraction_train": dead.get("dead_fraction_train"),
            "dead_after_tokens": dead.get("dead_after_tokens"),
            "dead_fraction_heldout": metrics.get("dead_fraction_heldout"),
            "dead_fraction_heldout_half": metrics.get("dead_fraction_heldout_half"),
            "l0_by_layer": metrics.get("l0_by_layer"),
            "fvu_by_layer": metrics.get("fvu_by_layer"),
            "fvu_target_inputs_by_layer": metrics.get("fvu_target_inputs_by_layer"),
            "nmse_by_layer": metrics["nmse_by_layer"],
            "n_tokens": metrics["n_tokens"],
            "train_seconds": info["train_seconds"] if info else 0.0,
        }
    return models


def sweep_checks(models: dict) -> dict[str, bool]:
    """The sweep's checks: L0 falls as l1_weight rises; the analysis adapter (``analysis_models``) has L0 in the
    paper's range and a held-out KL at most a tenth of the hybrid's."""
    adapters = sorted((n for n in models if models[n]["kind"] == "adapter"), key=lambda n: models[n]["l1_weight"])
    l0s = [models[n]["l0"] for n in adapters]
    chosen = analysis_models(models)
    analysis = models[chosen["analysis_model"]]
    low, high = L0_RANGE
    return {
        "L0 decreases monotonically as l1_weight increases": all(a > b for a, b in zip(l0s, l0s[1:])),
        f"analysis adapter L0 in [{low:g}, {high:g}]": chosen["analysis_in_range"],
        "analysis adapter KL <= hybrid KL / 10": analysis["kl"] <= models["hybrid"]["kl"] / 10,
    }


def study_model(train_results: dict, choice: str | None = None) -> str:
    """The adapter notebooks 04-06 study, from notebook 01's results: ``None`` the sweep's ``analysis_model`` (the
    rule in ``analysis_models``); ``"paper_l0"`` the adapter whose held-out L0 is nearest the paper's (``paper_values.json``'s
    ``setup.analysis_l0``,
    on a log scale); else a trained run's name."""
    if choice is None:
        return train_results["analysis_model"]
    models = train_results["models"]
    if choice == "paper_l0":
        adapters = [n for n, m in models.items() if m.get("kind") == "adapter" and m.get("l0")]
        if not adapters:
            raise ValueError("no adapter with a held-out L0 in 01_train.json; run notebook 01 first")
        return min(adapters, key=lambda n: abs(math.log(models[n]["l0"] / reported()["setup"]["analysis_l0"])))
    if choice not in models:
        raise ValueError(f"adapter {choice!r} is not among notebook 01's runs {sorted(models)}; pass None, "
                         "'paper_l0' or one of those names")
    return choice


def load_studied(pair: Pair, results_dir, choice: str | None = None, train_root: Path | None = None):
    """The adapter model notebooks 04-06 study: its name (``study_model`` on notebook 01's results in
    ``results_dir``) and the model (``load_named``, runs under ``train_root``, None: the pair's)."""
    name = study_model(read_results("01_train", results_dir, config=pair.name), choice)
    return name, load_named(pair, name, train_root)


def analysis_models(models: dict) -> dict:
    """The adapters later notebooks study, chosen by one rule used everywhere (notebook 01 writes it to
    results/01_train.json; notebooks 02-06 read ``analysis_model`` from there):

    * ``analysis_model``: among adapters with held-out L0 in the paper's range ``L0_RANGE`` (1-10 active features
      per token per layer), the one with the lowest held-out KL; if none is in range, the one whose L0 is nearest
      the range on a log scale (L0 spans orders of magnitude; ties go to the lower KL). ``analysis_rule`` says
      which applied and ``analysis_in_range`` whether the model is in range;
    * ``lowest_penalty_model``: the adapter with the smallest L1 weight (the most faithful, least sparse).

    ``models``: {name: {"kind", "l1_weight", "l0", "kl", ...}} as ``evaluate_sweep`` gives them."""
    adapters = sorted((n for n in models if models[n]["kind"] == "adapter" and models[n].get("l0") is not None),
                      key=lambda n: models[n]["l1_weight"])
    if not adapters:
        raise ValueError("no adapter with a held-out L0 among the models; train the sweep first (notebook 01)")
    low, high = L0_RANGE
    in_range = [n for n in adapters if low <= models[n]["l0"] <= high]
    if in_range:
        chosen = min(in_range, key=lambda n: models[n]["kl"])
        rule = f"lowest held-out KL among the adapters with held-out L0 in [{low:g}, {high:g}] ({len(in_range)} of " \
               f"{len(adapters)})"
    else:
        def distance(name):
            l0 = max(models[name]["l0"], 1e-6)
            return max(math.log(low / l0), math.log(l0 / high), 0.0), models[name]["kl"]

        chosen = min(adapters, key=distance)
        rule = f"no adapter has held-out L0 in [{low:g}, {high:g}]; the one whose L0 ({models[chosen]['l0']:.3g}) " \
               "is nearest that range on a log scale"
    return {"analysis_model": chosen, "analysis_rule": rule, "analysis_in_range": bool(in_range),
            "analysis_l0_range": [low, high], "lowest_penalty_model": adapters[0]}


def train_results(pair: Pair, plan: SweepPlan, models: dict, batches: list[dict]) -> dict:
    """``01_train.json`` (without ``config``): every run's held-out numbers, the analysis adapters chosen by the
    rule (``analysis_models``) and the sweep's checks, the plan, and what the held-out numbers were measured on."""
    return {
        "models": models, **analysis_models(models), "checks": sweep_checks(models),
        "local_mse_calibration": local_mse_calibration(pair) if plan.baselines else None,
        "plan": {"l1_weights": list(plan.l1_weights), "train_config": asdict(plan.base),
                 "n_validation_batches": plan.n_validation_batches, "calibration_steps": plan.trial_steps,
                 "calibration_trials": plan.calibration_trials},
        "n_validation_tokens": int(sum(b["attention_mask"].sum() for b in batches)),
        "text": HELDOUT_TEXT, "scored_positions": scored_positions_description(include_prompt=True),
    }
