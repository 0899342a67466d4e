"""Active context management (Sculptor, Li et al. 2025, https://arxiv.org/abs/2508.04664) as a
layer in front of a language model: operators (`operators`), policies (`policies`, config group
``context``) and the wrapper the runner puts around the model (`wrapper`)."""
from .operators import Fragment, Workspace, fragment, render, search, summarise
from .policies import Learned, NoContext, Oracle, Policy, Recency
from .wrapper import ContextManaged, attach

__all__ = ["ContextManaged", "Fragment", "Learned", "NoContext", "Oracle", "Policy", "Recency",
           "Workspace", "attach", "fragment", "render", "search", "summarise"]
