"""Sequence backbones (mom, gdn, gla, transformer): shapes, task routing isolation, cached
decoding, attention against its formula, a learning sanity check."""
import pytest
import torch

from cl_toolkit.layers.attention import Attention, rotary
from cl_toolkit.models.language import SequenceLanguageModel
from cl_toolkit.models.sequence import SequenceImageBackbone

from .conftest import rel_err


@pytest.mark.parametrize("shape,patch,tokens", [((1, 8, 8), None, 16), ((3, 32, 32), 4, 64),
                                                ((1, 28, 28), 4, 49)], ids=["digits", "cifar",
                                                                            "fmnist"])
def test_image_backbone_shapes(shape, patch, tokens):
    net = SequenceImageBackbone(shape, mixer="mom", patch_size=patch, hidden_size=16,
                                num_layers=1)
    assert net.num_tokens == tokens and not net.uses_task_id
    feats = net(torch.randn(2, *shape))
    assert feats.shape == (2, net.feat_dim) and torch.isfinite(feats).all()
    (feats.sum() + net.aux_loss).backward()
    assert net.embed.weight.grad.abs().sum() > 0


def test_patches_are_raster_ordered():
    net = SequenceImageBackbone((1, 4, 4), mixer="mom", patch_size=2, hidden_size=16,
                                num_layers=1)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert net.tokens(x)[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13],
                                         [10, 11, 14, 15]]


def test_task_routing_keeps_tasks_on_disjoint_memories():
    net = SequenceImageBackbone((1, 8, 8), mixer="mom", patch_size=2, hidden_size=16,
                                num_layers=2, task_routing=True, num_tasks=3, memories_per_task=2,
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


def test_image_backbone_in_the_toolkit_classifier():
    # The contract cl_toolkit.models.Classifier relies on: feat_dim, uses_task_id, forward(x, t).
    from cl_toolkit.models import Classifier

    net = SequenceImageBackbone((1, 8, 8), mixer="mom", patch_size=2, hidden_size=16,
                                num_layers=1, task_routing=True, num_tasks=2, memories_per_task=2)
    model = Classifier(net, num_classes=4, heads=2)
    assert model.uses_task_id and model.feat_dim == 16
    logits = model(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 1]))
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()


@pytest.mark.parametrize("mixer", ["mom", "gdn", "gla", "transformer"])
def test_sequence_lm_cached_decoding_matches_full_forward(mixer):
    # Token by token and in two pieces through step(): the recurrent (or key/value cache)
    # path against the chunked full forward.
    lm = SequenceLanguageModel(11, mixer=mixer, hidden_size=16, num_layers=2,
                               tie_embeddings=False).double()
    ids = torch.randint(0, 11, (2, 9))
    full = lm(ids)
    assert full.shape == (2, 9, 11) and lm.aux_loss.shape == ()
    caches, steps = None, []
    for t in range(ids.shape[1]):
        out, caches = lm.step(ids[:, t:t + 1], caches)
        steps.append(out)
    assert rel_err(torch.cat(steps, 1), full) < 1e-10
    head, caches = lm.step(ids[:, :4])
    tail, _ = lm.step(ids[:, 4:], caches)
    assert rel_err(torch.cat([head, tail], 1), full) < 1e-10


@pytest.mark.parametrize("causal", [True, False])
def test_attention_mixer_matches_softmax_attention(causal):
    att = Attention(16, num_heads=2, causal=causal).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    y, _, _ = att(x)
    q, k, v = att.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    q, k = rotary(q, 0), rotary(k, 0)
    s = q @ k.transpose(-1, -2) / 8 ** 0.5
    if causal:
        s = s.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    ref = att.o_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
    assert rel_err(y, ref) < 1e-12

def test_rotary_is_a_relative_rotation():
    q, k = torch.randn(2, 1, 2, 5, 8, dtype=torch.float64).unbind(0)
    assert rel_err(rotary(q, 3).norm(dim=-1), q.norm(dim=-1)) < 1e-12
    # Scores depend on position differences only: shifting both by 7 changes nothing.
    scores = rotary(q, 0) @ rotary(k, 0).transpose(-1, -2)
    assert rel_err(rotary(q, 7) @ rotary(k, 7).transpose(-1, -2), scores) < 1e-12
    assert rel_err(rotary(q, 0) @ rotary(k, 1).transpose(-1, -2), scores) > 1e-3


@pytest.mark.parametrize("mixer", ["mom", "gdn", "gla", "transformer"])
def test_sequence_lm_learns_a_repeating_pattern(mixer):
    torch.manual_seed(0)
    lm = SequenceLanguageModel(5, mixer=mixer, hidden_size=16, num_layers=1, num_heads=2)
    ids = torch.tensor([[0, 1, 2, 3, 4] * 4])
    opt = torch.optim.Adam(lm.parameters(), lr=3e-2)
    losses = []
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(lm(ids[:, :-1])[0], ids[0, 1:])
        opt.zero_grad()
        (loss + lm.aux_loss).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_sequence_lm_refuses_ids_outside_its_vocabulary():
    lm = SequenceLanguageModel(7, mixer="gdn", hidden_size=16, num_layers=1)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 7\) \(model vocab_size\)"):
        lm(torch.tensor([[1, 7]]))
    with pytest.raises(ValueError, match="causal=false needs mixer='transformer'"):
        SequenceLanguageModel(7, mixer="gdn", causal=False)
