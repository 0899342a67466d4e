"""Conditional VAE with a learnable class-conditional prior: the generator of GKCL.

GKCL (Derakhshani et al. 2021, https://arxiv.org/abs/2112.13410) replaces KCL's coresets by a
conditional generative model that produces each task's support set on demand. No public code of
GKCL exists; this generator is our reconstruction from the paper: an MLP conditional VAE
(Sohn et al. 2015, https://papers.nips.cc/paper/5775) with

    q(z | x, c) = N(mu_enc(x, c), diag(sigma_enc^2))
    p(z | c)    = N(mu_c, diag(sigma_c^2))             (learnable per class)
    p(x | z, c) = Bernoulli(dec(z, c))  for pixels in [0, 1], or
                  N(dec(z, c), s^2 I)   with a learnable scalar s (normalised pixels, features)

    ELBO(x, c) = E_q[log p(x | z, c)] - KL(q(z | x, c) || p(z | c))     (one sample of z)

Data are flattened to ``[B, data_dim]``; samples are returned in ``data_shape``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cl_toolkit.errors import unknown_name

from .kernel_machine import gaussian_kl

LIKELIHOODS = ("bernoulli", "gaussian")


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConditionalVAE(nn.Module):
    """MLP CVAE; ``hidden`` are the encoder widths (the decoder mirrors them)."""

    def __init__(self, data_shape: Sequence[int], num_classes: int, z_dim: int = 32,
                 hidden: Sequence[int] = (400,), likelihood: str = "bernoulli"):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise unknown_name("likelihood", likelihood, LIKELIHOODS)
        self.data_shape, self.num_classes = tuple(data_shape), num_classes
        self.z_dim, self.likelihood = z_dim, likelihood
        self.data_dim = math.prod(self.data_shape)
        hidden = list(hidden)
        self.encoder = _mlp([self.data_dim + num_classes, *hidden, 2 * z_dim])
        self.decoder = _mlp([z_dim + num_classes, *hidden[::-1], self.data_dim])
        # Prior means start apart (N(0, I) draws) so that the classes are separated in z-space
        # from the first step instead of all sharing N(0, I).
        self.prior_mu = nn.Parameter(torch.randn(num_classes, z_dim))
        self.prior_logvar = nn.Parameter(torch.zeros(num_classes, z_dim))
        if likelihood == "gaussian":
            self.log_scale = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def copy_conditions(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Make conditions ``dst`` start as copies of conditions ``src`` (index tensors of equal
        length): their prior rows and the one-hot input weights of encoder and decoder."""
        self.prior_mu[dst] = self.prior_mu[src]
        self.prior_logvar[dst] = self.prior_logvar[src]
        for first, offset in ((self.encoder[0], self.data_dim), (self.decoder[0], self.z_dim)):
            first.weight[:, offset + dst] = first.weight[:, offset + src]

    def _onehot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.num_classes).to(like.dtype)

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x, c): mean and log-variance ``[B, z_dim]``."""
        x = x.reshape(x.shape[0], -1)
        mu, logvar = self.encoder(torch.cat([x, self._onehot(y, x)], 1)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 12.0)

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Decoder output ``[B, data_dim]``: Bernoulli logits or Gaussian means."""
        return self.decoder(torch.cat([z, self._onehot(y, z)], 1))

    def log_likelihood(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """log p(x | z, c) summed over data dimensions: ``[B]``."""
        x = x.reshape(x.shape[0], -1)
        if self.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
        s = self.log_scale
        return (-0.5 * ((x - out) / s.exp()) ** 2 - s - 0.5 * math.log(2 * math.pi)).sum(1)

    def elbo(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
        """Per-sample terms ``[B]``: reconstruction log-likelihood, KL, and ELBO = rec - KL.
        ``eps`` ``[B, z_dim]`` fixes the reparameterisation noise (tests)."""
        mu, logvar = self.encode(x, y)
        if eps is None:
            eps = torch.randn_like(mu)
        z = mu + (0.5 * logvar).exp() * eps
        rec = self.log_likelihood(x, self.decode(z, y))
        kl = gaussian_kl(mu, logvar, self.prior_mu[y], self.prior_logvar[y])
        return {"rec": rec, "kl": kl, "elbo": rec - kl}

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per sample, averaged over the batch."""
        return -self.elbo(x, y)["elbo"].mean()

    @torch.no_grad()
    def sample(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoder means for z ~ p(z | c): ``[N, *data_shape]``. The noise is drawn on the CPU
        from ``generator`` so that a seeded call gives the same samples on any device."""
        eps = torch.randn(y.shape[0], self.z_dim, generator=generator).to(self.prior_mu.device)
        z = self.prior_mu[y] + (0.5 * self.prior_logvar[y]).exp() * eps
        out = self.decode(z, y)
        if self.likelihood == "bernoulli":
            out = torch.sigmoid(out)
        return out.reshape(y.shape[0], *self.data_shape)
