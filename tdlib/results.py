"""The results contract (docs/method.md, section 8): each notebook writes results/NN_name.json atomically.

Results travel: a results file never records an absolute path of the machine that wrote it (``write_results``
refuses one, naming the key); model folders and data files are recorded relative to the pair file or the
repository (``tdlib.pairs.Pair.portable``), or as hub ids."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

COMMITTED_OUTPUTS = {"organism": ("results", "figures"), "smollm2": ("results/smollm2", "figures/smollm2")}
"""The configurations whose results and figures the repository commits (``make figures CONFIG=...`` rewrites
them, ``make paper`` reads them), and their folders, relative to the repository root."""


def resolve(path: str | Path) -> Path:
    """Relative paths are taken from the repository root, so notebooks run from any working directory."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; results are for everyone to read
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_results(stem: str, results: dict, config: str, results_dir: str | Path = "results") -> Path:
    """Write ``results_dir/<stem>.json`` with the config name recorded (numbers of different pairs never mix)."""
    if not config:
        raise ValueError("results must record the configuration name (e.g. 'organism' or a hub pair)")
    found = absolute_paths(results)
    if found:
        where, text = found[0]
        raise ValueError(f"{stem}.json would record an absolute path of this machine at {where}: {text!r} "
                         f"({len(found)} in all); record it relative to the pair file or the repository "
                         "(tdlib.pairs.Pair.portable) or as a hub id, so the results mean the same elsewhere")
    path = resolve(results_dir) / f"{stem}.json"
    text = json.dumps(_finite({"config": config, **results}), indent=2, sort_keys=False, allow_nan=False)
    atomic_write_text(path, text + "\n")
    return path


_PATH_TOKEN = re.compile(r"""(?:^|(?<=[\s(\[{'"=:,]))(/[^\s()\[\]{}'",;]+)""")


def absolute_paths(value, where: str = "") -> list[tuple[str, str]]:
    """(key path, string) for every string in ``value`` (nested dicts and lists) that is or contains an absolute
    path of this machine: a ``/first/...`` token whose first component is a folder here (``/tmp/...``,
    ``/home/...``), so "per 1/1000 tokens" or a lone "/" are not paths."""
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in absolute_paths(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, (list, tuple)):
        return [hit for i, v in enumerate(value) for hit in absolute_paths(v, f"{where}[{i}]")]
    if isinstance(value, str):
        for token in _PATH_TOKEN.findall(value):
            parts = [p for p in token.split("/") if p]
            if len(parts) >= 2 and os.path.isdir("/" + parts[0]):
                return [(where or "<top>", value)]
    return []


def _finite(value):
    """NaN and infinities become null: strict JSON readers (browsers, jq) reject them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_results(stem: str, results_dir: str | Path = "results", config: str | None = None) -> dict:
    """A stage's results file; with ``config``, refuse one written for another pair configuration (a later stage
    must not mix one pair's models with another's results)."""
    path = resolve(results_dir) / f"{stem}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the notebook that writes it first (make figures)")
    results = json.loads(path.read_text())
    if config is not None and results.get("config") != config:
        raise ValueError(f"{path} is for config {results.get('config')!r}, not {config!r}: run notebook "
                         f"{stem.split('_')[0]} with config={config!r} first (or point results_dir at its results)")
    return results


@contextmanager
def atomic_directory(path: str | Path):
    """Yield a staging folder beside ``path``; on success it replaces ``path`` whole, on error it is removed.

    Readers never see a half-written folder (a checkpoint, a cache, a built model pair)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
