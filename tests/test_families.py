"""Every architecture family in docs/real_models.md's table: the splice reproduces the target and the hybrid,
a training step runs, the adapter model generates (tiny random models, seconds)."""
import copy
import tempfile

import pytest
import torch

from measure_placement import RandomTokens
from families import FAMILIES, family_model
from tdlib.adapter import AdapterSet
from tdlib.splice import build_hybrid_copy, mlp_choice, splice
from tdlib.train import TrainConfig, train

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_splice_train_and_generate(family):
    base, target = family_model(family, seed=0), family_model(family, seed=1)
    reference, hybrid = copy.deepcopy(target), build_hybrid_copy(target, base)
    model = splice(target, base, AdapterSet.for_model(target, n_features=8))
    with torch.no_grad():
        with mlp_choice(model, "target"):
            assert torch.allclose(model(IDS).logits, reference(IDS).logits, atol=1e-6)
        with mlp_choice(model, "base"):
            assert torch.allclose(model(IDS).logits, hybrid(IDS).logits, atol=1e-6)
        with mlp_choice(model, "adapter"):  # a fresh adapter (W_dec = 0) is the hybrid
            assert torch.allclose(model(IDS).logits, hybrid(IDS).logits, atol=1e-6)
    with tempfile.TemporaryDirectory() as run_dir:
        log = train(model, RandomTokens(batch_size=2, length=8), TrainConfig(n_features=8, steps=2), run_dir,
                    progress=False).log
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in log)
    with torch.no_grad(), mlp_choice(model, "adapter"):
        out = model.generate(IDS[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, IDS.shape[1] + 3)
