"""CLIP-ViT classifiers for model merging: an open_clip image tower behind frozen zero-shot heads.

The protocol of task arithmetic (https://arxiv.org/abs/2212.04089) and OPCM
(https://arxiv.org/abs/2501.09522): each task's classification head is built from its class
names and prompt templates with the text tower (normalise each embedding, average over
templates, normalise again) and stays frozen; only the image tower is fine-tuned and merged
(merge strategies: ``finetune_params: ["image_encoder."]``);
``logits = exp(logit_scale) * cos(image, class)``. The CLIP task streams are built by
``cl_toolkit.benchmarks.clip_tasks``.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClToolkitError, ConfigError, suggest
from ..stream import TaskStream

# Prompt templates of a task that brings none of its own (``task.info["templates"]``).
PHOTO = ("a photo of a {}.", "a good photo of a {}.", "a close-up photo of the {}.")


class ClipWeightsNotFoundError(ClToolkitError, FileNotFoundError):
    """open_clip weights are neither cached nor downloadable here."""


class CLIPClassifier(nn.Module):
    """open_clip image tower + frozen zero-shot heads ``[num_classes, embed_dim]``.

    ``forward(x, t)``: ``x`` uint8 or float in [0, 1] ``[B, 3, S, S]``, normalised here with
    the model's mean / std; ``t`` (task ids ``[B]``) masks other tasks' classes to -inf. Heads
    and normalisation are non-persistent buffers, so task vectors never contain them.
    """

    uses_task_id = True

    def __init__(self, image_encoder: nn.Module, heads: torch.Tensor,
                 task_of_class: torch.Tensor, logit_scale: float,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.image_encoder, self.logit_scale = image_encoder, logit_scale
        self.register_buffer("heads", heads, persistent=False)
        self.register_buffer("task_of_class", task_of_class, persistent=False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        features = F.normalize(self.image_encoder((x - self.mean) / self.std), dim=-1)
        logits = self.logit_scale * features @ self.heads.T
        if t is not None:
            logits = logits.masked_fill(self.task_of_class[None, :] != t[:, None], float("-inf"))
        return logits


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _check_weights(model_name: str, pretrained: str, cache_dir: str | None) -> None:
    """Fail at once, before building the model, when the weights cannot be had."""
    import open_clip

    if Path(pretrained).expanduser().is_file():
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise ConfigError(
            f"open_clip has no pretrained tag {pretrained!r} for {model_name!r}."
            f"{suggest(pretrained, tags)} Tags: {', '.join(tags) or 'none'}; or pass a local "
            "weights file as pretrained."
        )
    if not _offline():
        return
    from huggingface_hub import try_to_load_from_cache

    hub = open_clip.get_pretrained_cfg(model_name, pretrained).get("hf_hub", "").strip("/")
    files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    if hub and any(isinstance(try_to_load_from_cache(hub, f, cache_dir=cache_dir), str)
                   for f in files):
        return
    raise ClipWeightsNotFoundError(
        f"Weights {model_name!r} / {pretrained!r} are not in the Hugging Face cache "
        f"({cache_dir or 'default cache'}) and HF_HUB_OFFLINE=1 forbids downloading them. "
        f"On a machine with internet run open_clip.create_model({model_name!r}, "
        f"pretrained={pretrained!r}) and copy the cache (hub repo {hub!r}), or pass the weights "
        "file's path as pretrained, or use pretrained=None for random weights."
    )


def clip_classifier(stream: TaskStream, model_name: str = "ViT-B-32",
                    pretrained: str | None = "openai", cache_dir: str | None = None,
                    device: str | torch.device = "cpu", model_kwargs: dict | None = None
                    ) -> CLIPClassifier:
    """Build the open_clip model, zero-shot heads for every task of ``stream`` (its
    ``class_names`` and each task's ``info["templates"]``), and keep only the image tower.
    ``model_kwargs`` override the architecture (e.g. a tiny tower for tests)."""
    import open_clip

    models = open_clip.list_models()
    if model_name not in models:
        close = difflib.get_close_matches(model_name, models, n=5, cutoff=0.6)
        raise ConfigError(
            f"open_clip has no model {model_name!r}."
            f"{' Close matches: ' + ', '.join(close) + '.' if close else ''} "
            f"open_clip.list_models() lists all {len(models)}."
        )
    if pretrained is not None:
        _check_weights(model_name, pretrained, cache_dir)
    try:
        # OpenAI's weights were trained with QuickGELU; open_clip only warns when the named
        # architecture uses plain GELU, so switch it on from the weights' own config.
        quick = bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False)) \
            if pretrained else False
        model = open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir,
                                       device=device,
                                       **{"force_quick_gelu": quick, **(model_kwargs or {})})
    except RuntimeError as exc:
        if "download" not in str(exc).lower():
            raise
        raise ClipWeightsNotFoundError(
            f"Could not get weights {model_name!r} / {pretrained!r}: {exc} Check the network "
            "or pass a local weights file as pretrained."
        ) from exc
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    heads, owner = [], []
    with torch.no_grad():
        for task in stream:
            templates = task.info.get("templates") or list(PHOTO)
            for c in task.classes:
                texts = [tpl.format(task.class_names[c]) for tpl in templates]
                emb = F.normalize(model.encode_text(tokenizer(texts).to(device)), dim=-1)
                heads.append(F.normalize(emb.mean(0), dim=-1))
                owner.append(task.index)
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return CLIPClassifier(model.visual, torch.stack(heads), torch.tensor(owner, device=device),
                          float(model.logit_scale.detach().exp()), mean, std).to(device)


# The model registry hands this builder the whole stream (it needs the class names for the
# zero-shot heads) instead of an input shape, and uses its classifier as is.
clip_classifier.needs_stream = True
