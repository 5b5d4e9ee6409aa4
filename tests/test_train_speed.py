"""The training step's shortcuts change no number, and the benchmark scripts run (tiny shapes, seconds)."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_train import RandomBatches, grads, spliced_model
import tdlib.train as train_module
from tdlib.metrics import kl_divergence, next_token_mask
from tdlib.models import anatomy
from tdlib.train import TrainConfig, kl_to_target, objective, target_distribution, trainable_parameters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def loss_and_grads(cut, replay: bool, monkeypatch, kind="adapter"):
    model = spliced_model()
    config = TrainConfig(kind=kind, n_features=16, l1_weight=0.01)
    trainable = {id(p) for p in trainable_parameters(model, config)}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
    if not replay:
        monkeypatch.setattr(train_module, "attention_reusable", lambda model: False)
    calls = []
    for block in anatomy(model).layers:
        block.self_attn.register_forward_hook(lambda *args: calls.append(1))
    result = objective(model, RandomBatches().batch(0), config, cut)
    result.loss.backward()
    monkeypatch.undo()
    return result.loss.detach(), grads(model), len(calls)


@pytest.mark.parametrize("kind", ["adapter", "mlp_finetune"])
@pytest.mark.parametrize("cut", [1, 2])
def test_replayed_attention_gives_the_same_loss_and_gradients_with_fewer_attention_calls(cut, kind, monkeypatch):
    """The loss is bitwise the same (the replayed values are); gradients to rounding (the replaced->target bridge's
    gradient joins the replaced pass's before its attention's backward, not after)."""
    loss, gradients, calls = loss_and_grads(cut, True, monkeypatch, kind)
    plain_loss, plain_gradients, plain_calls = loss_and_grads(cut, False, monkeypatch, kind)
    assert torch.equal(loss, plain_loss)
    assert gradients.keys() == plain_gradients.keys() and gradients
    for name in gradients:
        scale = plain_gradients[name].abs().max()
        assert (gradients[name] - plain_gradients[name]).abs().max() <= 1e-6 * scale, name
    assert calls == plain_calls - 3  # layer 0 of the adapter pass, layer k of each bridge


def test_attention_is_not_replayed_under_active_dropout():
    model = spliced_model()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    assert train_module.attention_reusable(model)
    model.config.attention_dropout = 0.1
    model.train()
    assert not train_module.attention_reusable(model)
    model.eval()
    assert train_module.attention_reusable(model)
    next(anatomy(model).layers[1].self_attn.parameters()).requires_grad_(True)  # a trained attention: no replay
    assert not train_module.attention_reusable(model)


def test_kl_to_target_equals_the_metric_and_its_gradient():
    batch = RandomBatches().batch(0)
    scored = next_token_mask(batch["attention_mask"])
    target_logits = torch.randn(3, 9, 96)
    logits = torch.randn(3, 9, 96, requires_grad=True)
    reference = kl_divergence(target_logits, logits, scored)
    (reference_grad,) = torch.autograd.grad(reference, logits)
    keep = scored.flatten().bool()
    rows = logits.flatten(0, 1)[keep]
    fast = kl_to_target(target_distribution(target_logits.flatten(0, 1)[keep]), rows)
    (fast_grad,) = torch.autograd.grad(fast, logits)
    assert torch.allclose(fast, reference, rtol=1e-6, atol=1e-7)
    assert torch.allclose(fast_grad, reference_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("vocab", [300, 32_000])
def test_the_training_kl_matches_a_float64_reference_where_the_kl_is_small(vocab):
    """A trained adapter's KL is ~1e-3 nats, far below the entropy: the training KL must not lose it to
    cancellation (the split form sum p log p - sum p log q was off by ~7e-4 relative at a 32k vocabulary)."""
    torch.manual_seed(0)
    target_logits = 4 * torch.randn(64, vocab)
    logits = target_logits + 0.05 * torch.randn(64, vocab)
    p, q = F.log_softmax(target_logits.double(), -1), F.log_softmax(logits.double(), -1)
    reference = (p.exp() * (p - q)).sum(-1).mean()
    assert 1e-4 < reference < 1e-2
    for value in (kl_to_target(target_distribution(target_logits), logits),
                  kl_divergence(target_logits, logits, torch.ones(64))):
        assert abs(value.double() - reference) / reference < 1e-4


def test_bench_train_reports_the_plain_unit_the_step_and_their_flop_ratio(capsys):
    import bench_train

    result = bench_train.main(["--shape", "tiny", "--batch-size", "2", "--seq-len", "8", "--n-features", "16",
                               "--cycles", "1", "--threads", "1"])
    assert result["cuts"] == [1, 2] and result["flops_full"] > result["flops_plain"] > 0
    assert result["ratio_wall"] > 0 and result["ratio_cpu"] > 0
    assert "next-token cross-entropy + backward over all weights" in capsys.readouterr().out


def test_cut_sets_are_spread_evenly_with_the_uniform_mean():
    from bench_train import cut_set

    assert cut_set(4, 1, None) == [1, 2, 3, 4]
    cuts = cut_set(30, 1, None)
    assert len(cuts) == 6 and cuts[0] == 1 and cuts[-1] == 30 and abs(sum(cuts) / 6 - 15.5) < 0.5


def test_bench_attribution_breaks_a_graph_into_phases_per_mode(capsys):
    import bench_attribution

    result = bench_attribution.main(["--shape", "tiny", "--n-features", "16", "--l0", "3", "--prompt-tokens", "10",
                                     "--repeats", "1", "--threads", "1"])
    from tdlib.attribution import MODES

    assert set(result["modes"]) == set(MODES)  # every mode by default
    for mode, entry in result["modes"].items():
        seconds = entry["seconds"]
        assert entry["n_active"] > 0 and entry["batches"] >= 1, mode
        parts = sum(seconds[p] for p in ("forward", "selection", "backward batches", "other", "pruning", "scores"))
        assert abs(parts - seconds["total"]) < 1e-6 and seconds["forward"] > 0 and seconds["backward batches"] > 0
    assert "vs frozen" in capsys.readouterr().out


def test_an_unbuilt_smollm2_pair_is_named_with_the_command_that_builds_it(tmp_path, monkeypatch):
    from bench_common import pair_or_exit
    from tdlib import smollm2

    monkeypatch.setattr(smollm2, "PAIR", dataclasses.replace(smollm2.PAIR, cache=tmp_path))
    with pytest.raises(SystemExit, match="make smollm2"):
        pair_or_exit("smollm2")


def test_bench_nnsight_checks_both_capture_paths_agree_then_times_them(capsys):
    import bench_nnsight

    result = bench_nnsight.main(["--config", "smoke", "--batch-size", "4", "--repeats", "1", "--threads", "1"])
    assert result["max_abs_difference"] <= 1e-4 and result["tokens"] > 0
    assert all(result[label]["wall_ms"] > 0 for label in ("plain", "hooks", "nnsight"))
    assert "nnsight / hooks" in capsys.readouterr().out


def test_bench_generate_compares_the_greedy_methods_only_on_identical_tokens(capsys):
    import bench_generate

    result = bench_generate.main(["--config", "smoke", "--batch-size", "4", "--n-prompts", "8", "--new-tokens", "30",
                                  "--repeats", "1", "--threads", "1", "--compact"])
    assert result["tokens"] > 0 and min(result["generate"], result["compact"], result["continuous"]) > 0
    assert "identical tokens on every path" in capsys.readouterr().out
