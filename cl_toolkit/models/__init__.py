"""Models, one module per kind: image backbones (``image``), the classifier heads put on any
backbone (``heads``), sequence backbones for images (``sequence``), language models for token
streams (``language``) and CLIP (``clip``). The registry names each builder by its module;
importing the package itself loads only the image backbones and the heads."""
from .heads import Classifier, task_mask
from .image import MLP, KCLReducedResNet18, ReducedResNet18, SmallCNN

__all__ = ["Classifier", "task_mask", "MLP", "SmallCNN", "ReducedResNet18",
           "KCLReducedResNet18"]
