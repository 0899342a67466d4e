"""MoM backbones: shapes, task routing isolation, cached decoding, a learning sanity check."""
import pytest
import torch

from cl_toolkit.kernels.backbones import MoMImageClassifierBackbone, MoMLanguageModel

from .conftest import rel_err


@pytest.mark.parametrize("shape,patch,tokens", [((1, 8, 8), None, 16), ((3, 32, 32), 4, 64),
                                                ((1, 28, 28), 4, 49)], ids=["digits", "cifar",
                                                                            "fmnist"])
def test_image_backbone_shapes(shape, patch, tokens):
    net = MoMImageClassifierBackbone(shape, patch_size=patch, hidden_size=16, num_layers=1)
    assert net.num_tokens == tokens and not net.uses_task_id
    feats = net(torch.randn(2, *shape))
    assert feats.shape == (2, net.feat_dim) and torch.isfinite(feats).all()
    (feats.sum() + net.aux_loss).backward()
    assert net.embed.weight.grad.abs().sum() > 0


def test_patches_are_raster_ordered():
    net = MoMImageClassifierBackbone((1, 4, 4), patch_size=2, hidden_size=16, num_layers=1)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert net.tokens(x)[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13],
                                         [10, 11, 14, 15]]


def test_task_routing_keeps_tasks_on_disjoint_memories():
    net = MoMImageClassifierBackbone((1, 8, 8), patch_size=2, hidden_size=16, num_layers=2,
                                     task_routing=True, num_tasks=3, memories_per_task=2,
                                     shared_memory=True).double()
    assert net.uses_task_id and net.blocks[0].mixer.num_memories == 6
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    net(x, torch.tensor([1, 1, 1, 1])).sum().backward()
    for block in net.blocks:
        grad = block.mixer.k_proj.grad
        assert grad[[0, 1, 4, 5]].abs().max() == 0      # memories of tasks 0 and 2
        assert grad[[2, 3]].abs().max() > 0             # task 1's own memories
        assert grad[6].abs().max() > 0                  # the shared memory
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 3\)"):
        net(x, torch.tensor([0, 1, 2, 3]))


def test_language_model_cached_decoding_matches_full_forward():
    torch.manual_seed(0)
    lm = MoMLanguageModel(11, hidden_size=16, num_layers=2, tie_embeddings=False).double()
    ids = torch.randint(0, 11, (2, 9))
    logits, _, _ = lm(ids)
    caches, steps = None, []
    for t in range(ids.shape[1]):
        out, _, caches = lm(ids[:, t:t + 1], caches=caches, use_cache=True)
        steps.append(out)
    assert rel_err(torch.cat(steps, 1), logits) < 1e-10


def test_language_model_learns_a_repeating_pattern():
    torch.manual_seed(0)
    lm = MoMLanguageModel(5, hidden_size=16, num_layers=1, num_heads=2)
    ids = torch.tensor([[0, 1, 2, 3, 4] * 4])
    opt = torch.optim.Adam(lm.parameters(), lr=3e-2)
    losses = []
    for _ in range(12):
        logits, aux, _ = lm(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:])
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_image_backbone_in_the_toolkit_classifier():
    # The contract cl_toolkit.models.Classifier relies on: feat_dim, uses_task_id, forward(x, t).
    from cl_toolkit.models import Classifier

    net = MoMImageClassifierBackbone((1, 8, 8), patch_size=2, hidden_size=16, num_layers=1,
                                     task_routing=True, num_tasks=2, memories_per_task=2)
    model = Classifier(net, num_classes=4, heads=2)
    assert model.uses_task_id and model.feat_dim == 16
    logits = model(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 1]))
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()
