"""KCL's protocols against the authors' public code (github.com/mmderakhshani/KCL): learning-rate
schedule, the SplitCIFAR100 search-script values and the authors' reduced ResNet."""
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from torch import nn

from cl_toolkit.models import MLP, Classifier, KCLReducedResNet18
from cl_toolkit.runner import build_model, build_strategy
from cl_toolkit.strategy import RunContext

from test_kcl import blob_stream

PROTOCOLS = ["kcl_rotated_fashion_mnist", "kcl_permuted_fashion_mnist",
             "kcl_rotated_fashion_mnist_small", "kcl_permuted_fashion_mnist_small",
             "gkcl_rotated_fashion_mnist", "gkcl_permuted_fashion_mnist", "kcl_split_cifar100",
             "gkcl_split_cifar100_equal_memory", "gkcl_split_cifar100_tenth_memory"]


def composed(name):
    with initialize_config_module("cl_toolkit.conf", version_base=None):
        return OmegaConf.to_container(compose("config", [f"experiment={name}"]), resolve=True)


@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_lr_of_task_t_is_lr_times_decay_to_the_t_plus_1(name):
    """The reference trains task t (from 1) at max(lr * gamma^t, 5e-5): the first task already
    at lr * gamma."""
    cfg = composed(name)
    strategy = build_strategy(cfg)
    stream = blob_stream(n_tasks=3)
    strategy.setup(stream, Classifier(MLP(stream.input_shape, (8,)), stream.num_classes),
                   RunContext(seed=0, generator=torch.Generator().manual_seed(0)))
    lr, decay = cfg["strategy"]["lr"], cfg["strategy"]["lr_decay"]
    for t in range(3):
        strategy.tasks_seen = t
        assert strategy.current_lr() == pytest.approx(max(lr * decay ** (t + 1), 5e-5))


def test_split_cifar100_uses_the_authors_search_script_values_and_backbone():
    cfg = composed("kcl_split_cifar100")
    s = cfg["strategy"]
    assert (s["lr"], s["lr_decay"], s["tau"], s["num_features"], s["coreset_per_class"],
            s["batch_size"], s["kernel"]) == (0.3, 0.95, 0.01, 2048, 20, 10, "vrf")
    assert cfg["model"]["name"] == "resnet18_reduced_kcl" and cfg["model"]["dropout"] == 0.02
    stream = type("S", (), {"input_shape": (3, 32, 32), "num_classes": 100, "task_il": False, "is_tokens": False,
                            "__len__": lambda self: 20})()
    model = build_model(cfg, stream)
    assert isinstance(model.backbone, KCLReducedResNet18)
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.02 for m in model.modules()) == 16


def test_authors_reduced_resnet_parameter_count_by_hand():
    """Per block: one 3x3 conv (the authors' second conv is never used), two BatchNorms, a
    bias-free 1x1 shortcut conv where the shape changes; stem 3x3 conv + BatchNorm."""
    nf, total, cin = 20, 3 * 20 * 9 + 2 * 20, 20
    for stage in range(4):
        planes = nf * 2 ** stage
        for block in range(2):
            total += cin * planes * 9 + 4 * planes + (cin * planes if cin != planes else 0)
            cin = planes
    net = KCLReducedResNet18((3, 32, 32), nf=nf, dropout=0.02)
    assert total == 480_580
    assert sum(p.numel() for p in net.parameters()) == total
    assert net.feat_dim == 160


def test_authors_block_order_conv_relu_bn_dropout_then_shortcut_relu_bn_dropout():
    """Eval mode (dropout off) against the block written out with functional calls."""
    torch.manual_seed(0)
    net = KCLReducedResNet18((3, 8, 8), nf=4, dropout=0.3)
    for m in net.modules():  # non-trivial BatchNorm statistics and affine values
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    net.eval()
    x = torch.randn(2, 3, 8, 8)

    def bn(m, h):
        return F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False)

    h = F.relu(bn(net.bn1, F.conv2d(x, net.conv1.weight, padding=1)))
    for block in net.layers:
        out = bn(block.bn1, F.relu(F.conv2d(h, block.conv.weight, stride=block.conv.stride,
                                            padding=1)))
        skip = h if len(block.shortcut) == 0 else F.conv2d(h, block.shortcut[0].weight,
                                                           stride=block.shortcut[0].stride)
        h = bn(block.bn2, F.relu(out + skip))
    torch.testing.assert_close(net(x), F.adaptive_avg_pool2d(h, 1).flatten(1))
    net.train()
    assert not torch.equal(net(x), net(x))  # dropout in every block
