"""Finished runs are reused when only memory settings changed, and trained again when the objective changed."""
import dataclasses
import json
import shutil

from tdlib.models import load_tokenizer
from tdlib.pairs import data_for
from tdlib.sweep import RUN_FILE, RunSpec, default_plan, run_dir, train_run


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
