"""The memory knobs of TrainConfig (chunked KL, gradient checkpointing) change memory, never the objective."""
import dataclasses

import pytest
import torch

from test_train import RandomBatches, grads, spliced_model
from tdlib.models import unwrap
from tdlib.metrics import next_token_mask
from tdlib.train import (CHECKPOINT, TrainConfig, chunked_kl_divergence, config_from_dict, kl_divergence,
                         objective, train, trainable_parameters, training_identity)


@pytest.fixture
def padded_batch():
    """Two sequences of 9 tokens, the first with 3 padding positions."""
    return RandomBatches(batch_size=2).batch(0)


def loss_and_grads(batch, cut, kind="adapter", **memory):
    model = spliced_model()
    config = TrainConfig(kind=kind, n_features=16, l1_weight=0.01, **memory)
    trainable = {id(p) for p in trainable_parameters(model, config)}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
    if config.gradient_checkpointing:
        from tdlib.splice import enable_gradient_checkpointing
        enable_gradient_checkpointing(model)
        assert unwrap(model).is_activation_checkpointing
    model.train()
    result = objective(model, batch, config, cut)
    result.loss.backward()
    return result, grads(model)


def assert_same(reference, other):
    (ref_result, ref_grads), (result, result_grads) = reference, other
    for term in ("loss", "kl", "bridge_kl", "nmse", "l1"):
        assert torch.allclose(getattr(result, term), getattr(ref_result, term), rtol=1e-5, atol=1e-6), term
    assert result_grads.keys() == ref_grads.keys() and ref_grads
    for name in ref_grads:
        scale = ref_grads[name].abs().max()
        assert (result_grads[name] - ref_grads[name]).abs().max() <= 1e-5 * scale + 1e-7, name


@pytest.mark.parametrize("cut", [0, 1, 3])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_objective_gives_the_same_loss_and_gradients(padded_batch, cut, chunk):
    reference = loss_and_grads(padded_batch, cut)
    assert_same(reference, loss_and_grads(padded_batch, cut, kl_chunk_tokens=chunk))
    assert_same(reference, loss_and_grads(padded_batch, cut, kl_chunk_tokens=chunk, gradient_checkpointing=True))


@pytest.mark.parametrize("cut", [0, 2])
def test_chunked_objective_of_the_mlp_finetune_gives_the_same_gradients(padded_batch, cut):
    reference = loss_and_grads(padded_batch, cut, kind="mlp_finetune")
    assert_same(reference, loss_and_grads(padded_batch, cut, kind="mlp_finetune", kl_chunk_tokens=4,
                                          gradient_checkpointing=True))


def test_chunked_kl_is_the_masked_mean_of_kl_divergence(padded_batch):
    mask = padded_batch["attention_mask"]
    head = torch.nn.Linear(8, 96, bias=False)
    target_hidden, hidden = torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    expected = kl_divergence(head(target_hidden), head(hidden), mask)
    for chunk in (1, 4, 15, 50):
        assert torch.allclose(chunked_kl_divergence(head, target_hidden, hidden, mask, chunk), expected, atol=1e-6)


def test_chunked_path_never_computes_full_sequence_logits(padded_batch):
    chunk = 4
    model = spliced_model()
    config = TrainConfig(n_features=16, kl_chunk_tokens=chunk)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in trainable_parameters(model, config):
        parameter.requires_grad_(True)
    rows = []
    handle = unwrap(model).get_output_embeddings().register_forward_hook(
        lambda module, args, output: rows.append(output.shape[:-1].numel()))
    try:
        objective(model, padded_batch, config, cut=1).loss.backward()  # the backward recomputes every chunk
    finally:
        handle.remove()
    scored_tokens = int(next_token_mask(padded_batch["attention_mask"]).sum())
    assert scored_tokens == int(padded_batch["attention_mask"].sum()) - padded_batch["input_ids"].shape[0]
    assert rows and max(rows) <= chunk < padded_batch["input_ids"].numel()
    # target and model head per chunk, for the adapter pass and both bridges, again in the backward pass; only at
    # the KL token set (the last real position of each row has no next token and is never run through the head)
    assert sum(rows) == 2 * 2 * 3 * scored_tokens


@pytest.mark.parametrize("kind", ["adapter", "mlp_finetune"])
def test_training_with_both_memory_knobs_ends_with_the_same_weights(tmp_path, kind):
    config = TrainConfig(kind=kind, n_features=16, l1_weight=0.01, steps=3, batch_size=3, lr=1e-2)
    plain, lean = spliced_model(), spliced_model()
    plain_log = train(plain, RandomBatches(), config, tmp_path / "plain", progress=False).log
    lean_config = dataclasses.replace(config, kl_chunk_tokens=5, gradient_checkpointing=True)
    lean_log = train(lean, RandomBatches(), lean_config, tmp_path / "lean", progress=False).log
    assert unwrap(lean).is_activation_checkpointing and not unwrap(plain).is_activation_checkpointing
    # float32 sums in another order (chunks; thread count): the mlp_finetune loss is ~0.008, and after one AdamW
    # step of lr 1e-2 the two runs' losses were seen 8e-7 apart (1.0e-4 relative, 2 threads); weights move by up to
    # 3e-2, of which ~4e-5 differ
    assert [row["loss"] for row in lean_log] == pytest.approx([row["loss"] for row in plain_log], rel=5e-4)
    lean_parameters = dict(lean.named_parameters())
    for name, parameter in plain.named_parameters():
        assert torch.allclose(parameter, lean_parameters[name], atol=3e-4), name


def test_memory_fields_are_not_part_of_the_training_identity():
    config = TrainConfig(n_features=16)
    old_style = {k: v for k, v in dataclasses.asdict(config).items()
                 if k not in ("kl_chunk_tokens", "gradient_checkpointing")}
    assert config_from_dict(old_style) == config
    lean = dataclasses.replace(config, kl_chunk_tokens=1024, gradient_checkpointing=True, checkpoint_every=7)
    assert training_identity(old_style) == training_identity(config) == training_identity(lean)
    assert training_identity(dataclasses.replace(config, l1_weight=0.5)) != training_identity(config)
    with pytest.raises(ValueError, match="kl_chunk_tokens"):
        TrainConfig(kl_chunk_tokens=0)


def test_a_checkpoint_from_before_the_memory_fields_resumes(tmp_path):
    config = TrainConfig(n_features=16, steps=2, batch_size=3)
    first = train(spliced_model(), RandomBatches(), config, tmp_path, progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    for name in ("kl_chunk_tokens", "gradient_checkpointing"):
        del state["config"][name]
    torch.save(state, tmp_path / CHECKPOINT)
    lean = dataclasses.replace(config, kl_chunk_tokens=4, gradient_checkpointing=True, checkpoint_every=1)
    resumed = train(spliced_model(), RandomBatches(), lean, tmp_path, progress=False)
    assert resumed.log == first.log  # nothing left to train: the checkpoint is at the last step
    with pytest.raises(ValueError, match="different TrainConfig"):
        train(spliced_model(), RandomBatches(), dataclasses.replace(lean, l1_weight=0.5), tmp_path, progress=False)


def test_chunking_refuses_models_that_transform_their_logits():
    from conftest import tiny_model

    from tdlib.train import chunkable_head

    model = tiny_model("gemma")
    assert chunkable_head(model) is model.get_output_embeddings()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0.*kl_chunk_tokens=None"):
        chunkable_head(model)


def test_the_default_placement_is_the_identity_of_runs_saved_before_the_field():
    """A run saved before ``placement`` existed trained at the architecture's default: the same run as
    ``placement=None``; an explicit placement is a different run, and an unknown one is refused."""
    config = TrainConfig(n_features=16)
    saved_before = {k: v for k, v in dataclasses.asdict(config).items() if k != "placement"}
    assert training_identity(saved_before) == training_identity(config)
    assert config_from_dict(saved_before) == config
    assert training_identity(dataclasses.replace(config, placement="mlp_output")) != training_identity(config)
    with pytest.raises(ValueError, match="placement must be None .* 'residual'"):
        TrainConfig(placement="after_norm")
