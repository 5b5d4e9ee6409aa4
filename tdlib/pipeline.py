"""Run the numbered notebooks in order with papermill: ``python -m tdlib.pipeline`` (what ``make figures`` calls).

Each notebook ``notebooks/NN_name.ipynb`` is executed with the parameters ``config``, ``results_dir`` and
``figures_dir``; executed copies go to ``runs/<run>/`` (git-ignored). The organism's results and figures are the
committed ``results/`` and ``figures/``, SmolLM2's (config ``smollm2``) the committed ``results/smollm2/`` and
``figures/smollm2/`` (``COMMITTED_OUTPUTS``); any other pair writes to ``runs/<config>/results`` and
``.../figures``. A failing notebook stops the run with
its name and the path of its executed copy, where the traceback is.

Any other parameter of a notebook's parameters cell can be set too, from the pair file's ``notebooks`` block and
from the command line (``--params name=value ...``, what ``make figures PARAMS="..."`` passes); the command line
wins. See ``notebook_overrides`` and docs/real_models.md ("Setting notebook parameters").
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
import sys
import time
from pathlib import Path

from jupyter_client import AsyncKernelManager

from .pair_files import validate_pair
from .pairs import organism_configs, pair_config, resolve_pair
from .problems import BENCHMARKS, benchmark_key, benchmark_names
from .results import COMMITTED_OUTPUTS, REPO_ROOT, resolve
from .sweep import LOCAL_MSE, describe_plan, notebook_plan

NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[\w-]+\.ipynb$")


def numbered_notebooks(directory: Path = REPO_ROOT / "notebooks") -> list[Path]:
    """The pipeline's notebooks, in order: ``NN_name.ipynb`` files."""
    found = sorted(p for p in directory.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))
    numbers = [p.name[:2] for p in found]
    duplicates = {n for n in numbers if numbers.count(n) > 1}
    if duplicates:
        raise ValueError(f"two notebooks share a number {sorted(duplicates)} in {directory}; renumber one")
    return found


def config_label(config: str) -> str:
    """A folder-safe name for a configuration: the pair's ``name`` for a pair file (its stem when the file has no
    name, as ``tdlib.pair_files.load_pair_file`` reads it), so two files called pair.json in different folders never
    share an output folder; ``->`` becomes ``--`` as in the pair's artifact folders."""
    name = _pair_file_name(config) if config.endswith(".json") else config
    return re.sub(r"[^\w.\-]+", "_", name.replace("->", "--"))


def _pair_file_name(config: str) -> str:
    path = resolve(config)
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or broken: resolving the pair reports it with the fix
        return Path(config).stem
    name = values.get("name") if isinstance(values, dict) else None
    return name if isinstance(name, str) and name else Path(config).stem


def default_output_dir(config: str) -> Path | None:
    """Where a configuration's results and figures go: None for the committed ones (``COMMITTED_OUTPUTS``, so
    ``make figures`` regenerates what the repository shows); ``runs/<config>/`` for any other pair, so a real pair
    never overwrites those numbers and a later ``--only NN`` finds the earlier notebooks' results."""
    return None if config in COMMITTED_OUTPUTS else REPO_ROOT / "runs" / config_label(config)


def run_parameters(config: str, smoke: bool, run_dir: Path, output_dir: Path | None = None) -> dict:
    """Smoke runs use the tiny organism and write into the run folder, never over the committed results;
    ``output_dir`` (when given) receives ``results/`` and ``figures/``."""
    if smoke:
        config, output_dir = "smoke", run_dir
    if output_dir is not None:
        return {"config": config, "results_dir": str(Path(output_dir) / "results"),
                "figures_dir": str(Path(output_dir) / "figures")}
    results_dir, figures_dir = COMMITTED_OUTPUTS.get(config, COMMITTED_OUTPUTS["organism"])
    return {"config": config, "results_dir": results_dir, "figures_dir": figures_dir}


class QuietShutdownKernelManager(AsyncKernelManager):
    """The notebook kernel's manager, minus the SIGINT that jupyter_client sends before every shutdown request.

    That interrupt races the kernel's last reply: when it lands after the kernel has answered the last cell but
    before it has restored its idle signal handler, the kernel logs "KeyboardInterrupt caught in kernel." under a
    notebook that succeeded (measured: 2 of 18 papermill runs of a small torch notebook; 0 of 12 with this class).
    Shutting an idle kernel down needs no interrupt; other interrupts (a cell timeout) are sent as before."""

    async def _async_interrupt_kernel(self) -> None:
        if self.shutting_down:
            return
        await super()._async_interrupt_kernel()


RESERVED_PARAMETERS = ("config", "results_dir", "figures_dir")
"""Set by the pipeline itself (``--config`` / ``CONFIG=``, ``--output-dir``), never by an override."""

_WORDS = {"true": True, "false": False, "none": None, "null": None}


def notebook_parameters(path: Path) -> dict[str, object]:
    """The names and default values of a notebook's parameters cell (the code cell tagged ``parameters``).
    A default that is not a literal (an expression) is recorded as ``...``: any value is accepted for it."""
    import nbformat

    notebook = nbformat.read(str(path), as_version=4)
    cells = [c for c in notebook.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if not cells:
        raise ValueError(f"{path.name} has no code cell tagged 'parameters'; tag the cell that sets its parameters")
    return dict(pair for node in ast.parse(cells[0].source).body if isinstance(node, ast.Assign)
                for pair in _assigned(node))


def _assigned(node: ast.Assign) -> list[tuple[str, object]]:
    """(name, literal default or ...) for ``a = 1`` and ``a, b = 1, 2``."""
    pairs = []
    for target in node.targets:
        unpacked = isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
        names = target.elts if isinstance(target, ast.Tuple) else [target]
        values = node.value.elts if unpacked else [node.value] * len(names)
        for name, value in zip(names, values):
            if isinstance(name, ast.Name):
                try:
                    pairs.append((name.id, ast.literal_eval(value) if unpacked or len(names) == 1 else ...))
                except ValueError:
                    pairs.append((name.id, ...))
    return pairs


def parse_value(text: str):
    """A command-line value as a Python value: ``true``/``false``/``none``/``null`` (any case), else a Python or
    JSON literal (ints, floats, strings, lists, dicts), else the text itself as a string (``backend=llm``)."""
    if text.strip().lower() in _WORDS:
        return _WORDS[text.strip().lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass

    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(items: list[str] | str | None) -> dict[str, dict[str, object]]:
    """``["n_prompts=10 baselines=false", "01_train.steps=50"]`` -> ``{"*": {...}, "01_train": {"steps": 50}}``.
    Each item is split like a shell line (quote a value that has spaces: ``'l1_weights=[0.01, 0.001]'``);
    ``name=value`` applies to every notebook that has ``name``, ``NN.name=value`` or ``NN_stem.name=value`` to one."""
    if isinstance(items, str):
        items = [items]
    overrides: dict[str, dict[str, object]] = {}
    for item in items or []:
        for word in shlex.split(item):
            key, equals, value = word.partition("=")
            if not equals or not key:
                raise ValueError(f"cannot read the parameter {word!r}: write name=value (e.g. n_prompts=10) or "
                                 "NN.name=value for one notebook (e.g. 01.steps=50)")
            scope, _, name = key.rpartition(".")
            overrides.setdefault(scope or "*", {})[name] = parse_value(value)
    return overrides


def _scope_matches(scope: str, notebook: Path) -> bool:
    return scope == "*" or scope in (notebook.stem, notebook.name[:2])


def _type_problem(name: str, value, default) -> str | None:
    """Why ``value`` cannot replace ``default`` (None when it can): None and a None default take anything."""
    if value is None or default is None or default is ...:
        return None
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:
        ok = isinstance(value, type(default))
    return None if ok else f"{name}={value!r} ({type(value).__name__}) where the default is {default!r}"


def notebook_overrides(notebooks: list[Path], *layers: dict[str, dict[str, object]]) -> dict[str, dict]:
    """Per notebook (by stem), the parameters to pass besides config and folders. ``layers`` are override blocks
    (``{"*": {...}, "01_train": {...}, "05": {...}}``) in increasing priority (pair file first, command line
    last); within a layer a notebook's own entry wins over ``"*"``. ``"*"`` applies a parameter to every notebook
    whose parameters cell has it. Refused, naming the fix: a reserved name, a scope that names no notebook, a name
    that no notebook in scope declares (with the parameter lists), a value of the wrong type."""
    declared = {p.stem: notebook_parameters(p) for p in notebooks}
    stems = {p.stem: p for p in notebooks}
    result: dict[str, dict] = {stem: {} for stem in declared}
    for layer in layers:
        for scope, values in (layer or {}).items():
            if not isinstance(values, dict):
                raise ValueError(f"notebook parameters for {scope!r} must be a mapping name -> value, got {values!r}")
            in_scope = [s for s, p in stems.items() if _scope_matches(scope, p)]
            if not in_scope:
                raise ValueError(f"{scope!r} names no notebook; use '*', a number like '01' or a stem like "
                                 f"'01_train' (the notebooks: {sorted(stems)})")
            reserved = sorted(set(values) & set(RESERVED_PARAMETERS))
            if reserved:
                raise ValueError(f"{reserved} are set by the pipeline: choose the pair with CONFIG= (--config) and the "
                                 "output folder with --output-dir, not with notebook parameters")
            for name, value in values.items():
                owners = [s for s in in_scope if name in declared[s]]
                if not owners:
                    listing = "; ".join(f"{s}: {', '.join(n for n in declared[s] if n not in RESERVED_PARAMETERS)}"
                                        for s in in_scope)
                    raise ValueError(f"unknown notebook parameter {name!r} for {scope!r}; the parameters are: "
                                     f"{listing}")
                for stem in owners:
                    problem = _type_problem(name, value, declared[stem][name])
                    if problem:
                        raise ValueError(f"{stem}: {problem}; give a value of the default's type")
        # a notebook's own entry beats "*" within one layer
        for scope in sorted(layer or {}, key=lambda s: s != "*"):
            for stem in (s for s, p in stems.items() if _scope_matches(scope, p)):
                result[stem].update({k: v for k, v in layer[scope].items() if k in declared[stem]})
    return result


def pair_notebook_block(config: str, smoke: bool = False) -> dict:
    """The pair's ``notebooks`` block (``HubPairConfig.notebooks``), after checking the pair up front
    (``tdlib.pair_files.validate_pair``: a multi-token hesitation word is refused here, before any notebook runs).
    Empty for the organism."""
    if smoke or config in organism_configs():
        return {}
    hub = pair_config(config)
    validate_pair(hub)
    return dict(hub.notebooks)


def plan_lines(config: str, smoke: bool = False, overrides: dict[str, dict] | None = None,
               params: dict[str, dict] | None = None) -> list[str]:
    """What ``config`` would train (``tdlib.sweep.describe_plan``) and generate in notebook 03, without building
    anything it lacks or reaching a hub. ``overrides``: ``notebook_overrides``' result (None: the pair's own
    ``notebooks`` block under the command line's ``params``)."""
    pair = resolve_pair("smoke" if smoke else config, build=False)
    notebooks = numbered_notebooks()
    if overrides is None:
        overrides = notebook_overrides(notebooks, dict(pair.hub.notebooks) if pair.hub is not None else {},
                                       params or {})

    def settings(number: str) -> dict:
        notebook = next(p for p in notebooks if p.name.startswith(number))
        return {**notebook_parameters(notebook), **overrides.get(notebook.stem, {})}

    plan = notebook_plan(pair, **settings("01"))
    benchmarks = settings("03")
    evaluated = [n for n in plan.run_names if benchmarks["include_local_mse"] or n != LOCAL_MSE]
    return describe_plan(pair, plan) + evaluation_plan(pair, len(evaluated) + 3, benchmarks)


def evaluation_plan(pair, n_models: int, settings: dict) -> list[str]:
    """Notebook 03's benchmarks, decoding and budget for ``pair`` under its parameters ``settings`` (defaults and
    overrides), with the most tokens it could generate."""
    sampled = settings["sampled"]
    samples = settings["n_samples"] if sampled else 1
    budget = settings["max_new_tokens"] or pair.max_new_tokens
    how = (f"sampled (T={settings['temperature']}, top-p {settings['top_p']}), pass@1 over {samples} samples"
           if sampled else "greedy")
    chosen = settings.get("benchmark")
    names = benchmark_names(pair, chosen)
    lines = [f"benchmarks: {', '.join(names)} (notebook 03 runs "
             f"{'every one the pair lists' if chosen is None else 'those given by benchmark='}); "
             f"{how}; up to {budget:,} new tokens per response; {n_models} models"]
    total = 0
    for name in names:
        spec = BENCHMARKS.get(benchmark_key(name))
        if spec is not None and spec.n_problems:
            problems = min(settings["n_problems"] or spec.n_problems, spec.n_problems)
            most = problems * samples * n_models * budget
            total += most
            lines.append(f"  {name}: {problems} problems x {samples} samples x {n_models} models: at most "
                         f"{token_count(most)} generated tokens")
    if len(names) > 1 and total:
        lines.append(f"  notebook 03 in all: at most {token_count(total)} generated tokens")
    return lines


def token_count(tokens: int) -> str:
    """``1,006,632,960`` -> ``"1,007M"``, ``204,800`` -> ``"205k"``."""
    return f"{tokens / 1e6:,.0f}M" if tokens >= 1e6 else f"{tokens / 1e3:,.0f}k" if tokens >= 1e3 else f"{tokens}"


def select_notebooks(notebooks: list[Path], only: list[str] | None) -> list[Path]:
    """The notebooks ``only`` names (numbers like ``05`` or stems like ``05_attribution``; None for all); a
    ``ValueError`` listing the notebooks there are when a name matches none."""
    if not only:
        return notebooks
    unknown = [name for name in only if not any(p.name[:2] == name or p.stem == name for p in notebooks)]
    if unknown:
        raise ValueError(f"ONLY={' '.join(unknown)} names no notebook; the notebooks are "
                         f"{', '.join(p.stem for p in notebooks)} (give their numbers, e.g. ONLY=\"05 06\")")
    return [p for p in notebooks if p.name[:2] in only or p.stem in only]


def run_pipeline(config: str = "organism", smoke: bool = False, only: list[str] | None = None,
                 run_dir: Path | None = None, output_dir: Path | None = None,
                 params: dict[str, dict] | None = None) -> Path:
    """Run the numbered notebooks (``only``: some of them) on ``config``. ``params`` (``parse_params``'s form)
    overrides notebook parameters over the pair file's ``notebooks`` block; both are checked before any notebook
    runs."""
    import papermill

    every = numbered_notebooks()
    if not every:
        raise FileNotFoundError(f"no notebooks to run (expected {REPO_ROOT / 'notebooks'}/NN_name.ipynb)")
    notebooks = select_notebooks(every, only)
    # checked against every notebook, so a pair file's block for 01 is valid in an `--only 05` run too
    overrides = notebook_overrides(every, pair_notebook_block(config, smoke), params or {})
    label = "smoke" if smoke else config_label(config)
    run_dir = run_dir or REPO_ROOT / "runs" / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    parameters = run_parameters(config, smoke, run_dir, output_dir)
    for line in plan_lines(config, smoke, overrides):
        print(f"[pipeline] {line}", flush=True)
    if overrides.get("01_train"):
        print(f"[pipeline] notebook 01 runs with {overrides['01_train']} in place of those defaults", flush=True)
    for notebook in notebooks:
        executed = run_dir / notebook.name
        started = time.time()
        extra = overrides[notebook.stem]
        print(f"[pipeline] {notebook.name} -> {executed}" + (f" with {extra}" if extra else ""), flush=True)
        try:
            # the cells' own output (tqdm bars, prints) streams to this terminal as the notebook runs
            papermill.execute_notebook(str(notebook), str(executed), parameters={**extra, **parameters},
                                       cwd=str(REPO_ROOT), kernel_name="python3", progress_bar=False,
                                       stdout_file=sys.stdout, stderr_file=sys.stderr,
                                       kernel_manager_class=QuietShutdownKernelManager)
        except papermill.PapermillExecutionError as error:
            raise SystemExit(f"[pipeline] {notebook.name} failed ({error.ename}: {error.evalue}); "
                             f"see the traceback in {executed}") from None
        print(f"[pipeline] {notebook.name} done in {time.time() - started:.0f} s", flush=True)
    return run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="organism", help="model configuration passed to every notebook")
    parser.add_argument("--smoke", type=int, default=0, help="1: tiny organism, outputs under runs/ only")
    parser.add_argument("--only", nargs="*", help="run only these notebooks (numbers like 00 or stems)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="folder for results/ and figures/ (default: the committed ones for the organism and "
                             "smollm2, runs/<config>/ for any other pair)")
    parser.add_argument("--plan", action="store_true", help="print what the notebooks would train and generate (with --params applied) and exit")
    parser.add_argument("--params", nargs="*", default=[],
                        help="notebook parameters, name=value (every notebook that has it) or NN.name=value (one "
                             "notebook); values are Python/JSON literals or true/false/none; they win over the "
                             "pair file's notebooks block")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or default_output_dir(args.config)
    try:
        params = parse_params(args.params)
    except ValueError as error:
        parser.error(str(error))
    if args.plan:
        try:
            print("\n".join(plan_lines(args.config, bool(args.smoke), params=params)))
        except (ValueError, RuntimeError) as error:  # a refused parameter, or a built pair's package missing
            raise SystemExit(f"[pipeline] {error}") from None
        return
    try:
        run_dir = run_pipeline(args.config, bool(args.smoke), args.only, output_dir=output_dir, params=params)
    except (ValueError, RuntimeError) as error:  # refused before any notebook ran (pair, parameter, package)
        raise SystemExit(f"[pipeline] {error}") from None
    print(f"[pipeline] all notebooks ran; executed copies in {run_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
