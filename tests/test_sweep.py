"""Finished runs are reused when only memory settings changed, and trained again when the objective changed."""
import dataclasses
import json
import shutil

from tdlib.models import load_tokenizer
from tdlib.pairs import data_for
import pytest

from tdlib.sweep import RUN_FILE, DamagedRunError, RunSpec, default_plan, load_named, run_dir, train_run


def test_a_run_written_before_the_memory_fields_is_loaded_and_a_changed_l1_is_retrained(smoke_runs, tmp_path):
    pair = smoke_runs
    plan = default_plan(pair)
    spec = plan.specs[0]
    shutil.copytree(run_dir(pair, spec.name), tmp_path / spec.name)
    info = json.loads((tmp_path / spec.name / RUN_FILE).read_text())
    for name in ("kl_chunk_tokens", "gradient_checkpointing"):
        info["train_config"].pop(name, None)
    (tmp_path / spec.name / RUN_FILE).write_text(json.dumps(info))

    lean = RunSpec(spec.name, dataclasses.replace(spec.config, kl_chunk_tokens=8, gradient_checkpointing=True,
                                                  checkpoint_every=5))
    _, result = train_run(pair, lean, data=None, root=tmp_path, progress=False)
    assert result is None  # loaded, not trained (there is no data to train on)

    changed = RunSpec(spec.name, dataclasses.replace(spec.config, l1_weight=spec.config.l1_weight * 2))
    data = data_for(pair, load_tokenizer(pair.target), batch_size=plan.base.batch_size, seed=plan.base.seed)
    _, result = train_run(pair, changed, data, root=tmp_path, progress=False)
    assert result is not None and len(result.log) == changed.config.steps
    saved = json.loads((tmp_path / spec.name / RUN_FILE).read_text())["train_config"]
    assert saved["l1_weight"] == changed.config.l1_weight


@pytest.mark.parametrize("damage", ["truncated weights", "unreadable run.json"])
def test_a_damaged_run_is_reported_with_its_path_and_the_fix_and_retrained(smoke_runs, tmp_path, damage):
    pair = smoke_runs
    plan = default_plan(pair)
    spec = next(s for s in plan.specs if s.config.kind == "adapter")
    folder = tmp_path / spec.name
    shutil.copytree(run_dir(pair, spec.name), folder)
    broken = folder / ("adapters/adapters.safetensors" if damage == "truncated weights" else RUN_FILE)
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 2])
    with pytest.raises(DamagedRunError) as caught:
        load_named(pair, spec.name, tmp_path)
    message = str(caught.value)
    assert str(broken) in message and "Delete it" in message and str(folder) in message
    assert "SafetensorError" in message or "JSONDecodeError" in message  # the cause, named, not raised bare
    data = data_for(pair, load_tokenizer(pair.target), batch_size=plan.base.batch_size, seed=plan.base.seed)
    _, result = train_run(pair, spec, data, root=tmp_path, progress=False)
    assert result is not None  # trained anew rather than failing deep inside a load
    load_named(pair, spec.name, tmp_path)
