"""The CLIP pipeline offline: a tiny open_clip architecture (random weights), tasks generated
here in torchvision's on-disk layouts, image tower fine-tuned and merged; and the errors."""
import time

import pytest
import torch
from PIL import Image

from cl_toolkit.benchmarks.clip_tasks import EUROSAT_NAMES, clip_stream
from cl_toolkit.errors import ConfigError, DatasetNotFoundError
from cl_toolkit.models.clip import ClipWeightsNotFoundError, clip_classifier
from cl_toolkit.merging.opcm import OPCM
from cl_toolkit.strategy import RunContext

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                       "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1}}
EUROSAT_DIRS = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
                "Pasture", "PermanentCrop", "Residential", "River", "SeaLake")


def write_images(folder, classes, per_class, seed):
    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            # class-dependent colour + noise, so the tasks are learnable
            base = torch.tensor([(c * 67) % 255, (c * 131) % 255, (c * 29) % 255])
            pixels = (base.view(1, 1, 3) + 40 * torch.randn(20, 20, 3, generator=g)).clamp(0, 255)
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / name / f"{i}.png")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_data")
    write_images(root / "eurosat" / "2750", EUROSAT_DIRS, 5, 0)
    write_images(root / "resisc45" / "NWPU-RESISC45", ("airport", "beach", "forest"), 8, 1)
    return root


def test_stream_classifier_and_merge_offline(root):
    stream = clip_stream(["EuroSAT", "RESISC45"], root, image_size=32)
    assert stream.scenario == "task-il" and stream.num_classes == 13
    eurosat, resisc = stream
    assert eurosat.classes == tuple(range(10)) and resisc.classes == (10, 11, 12)
    assert len(eurosat.train) == 40 and len(eurosat.test) == 10  # fixed 80/20 split
    assert eurosat.train.x.dtype == torch.uint8 and eurosat.train.x.shape[1:] == (3, 32, 32)
    assert stream.tasks[0].class_names[:10] == EUROSAT_NAMES
    assert stream.tasks[0].class_names[10:] == ("airport", "beach", "forest")

    torch.manual_seed(0)
    model = clip_classifier(stream, "ViT-B-32", pretrained=None, model_kwargs=TINY)
    assert not hasattr(model, "transformer")  # the text tower is gone
    assert model.heads.shape == (13, 16)
    torch.testing.assert_close(model.heads.norm(dim=-1), torch.ones(13))
    logits = model(resisc.test.x, torch.full((len(resisc.test),), 1))
    assert logits.shape == (len(resisc.test), 13)
    assert torch.isinf(logits[:, :10]).all() and torch.isfinite(logits[:, 10:]).all()
    assert all(k.startswith("image_encoder.") for k in model.state_dict())

    heads = model.heads.clone()
    strategy = OPCM(epochs=1, lr=1e-3, batch_size=16, finetune_params=["image_encoder."])
    strategy.setup(stream, model, RunContext(generator=torch.Generator().manual_seed(0)))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for task in stream:
        strategy.learn(task)
    after = model.state_dict()
    assert any(not torch.equal(base[k], after[k]) for k in base)
    assert torch.equal(model.heads, heads)
    assert strategy.predict(eurosat.test.x, eurosat).shape == (10, 13)


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(ConfigError, match=r"no model 'ViT-B-23'.*Close matches: .*ViT-B-32"):
        clip_classifier(None, "ViT-B-23", pretrained=None)


def test_missing_weight_fails_at_once_offline(tmp_path, root):
    stream = clip_stream(["RESISC45"], root, image_size=32)
    start = time.perf_counter()
    with pytest.raises(ClipWeightsNotFoundError, match=r"'ViT-B-32' / 'openai'.*HF_HUB_OFFLINE"):
        clip_classifier(stream, "ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5
    with pytest.raises(ConfigError, match=r"no pretrained tag 'opnai'.*Did you mean 'openai'"):
        clip_classifier(stream, "ViT-B-32", pretrained="opnai")


def test_missing_dataset_says_where_to_put_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"RESISC45.*resisc45/NWPU-RESISC45"):
        clip_stream(["RESISC45"], tmp_path, image_size=32)
    with pytest.raises(ConfigError, match=r"Unknown CLIP task 'EuroSat'.*Did you mean 'EuroSAT'"):
        clip_stream(["EuroSat"], tmp_path)
