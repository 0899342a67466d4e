"""Conditional VAE generator of GKCL: ELBO against torch.distributions, and it trains."""
import pytest
import torch

from cl_toolkit.errors import ConfigError
from cl_toolkit.strategies.cvae import ConditionalVAE

D = torch.distributions


def _oracle_elbo(vae, x, y, eps):
    """The same ELBO written with torch.distributions objects."""
    mu, logvar = vae.encode(x, y)
    q = D.Normal(mu, (0.5 * logvar).exp())
    prior = D.Normal(vae.prior_mu[y], (0.5 * vae.prior_logvar[y]).exp())
    z = mu + q.stddev * eps
    out = vae.decode(z, y)
    flat = x.reshape(len(x), -1)
    if vae.likelihood == "bernoulli":
        rec = D.Bernoulli(logits=out, validate_args=False).log_prob(flat).sum(1)
    else:
        rec = D.Normal(out, vae.log_scale.exp()).log_prob(flat).sum(1)
    return rec - D.kl_divergence(q, prior).sum(1)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_elbo_matches_torch_distributions(likelihood):
    torch.manual_seed(0)
    vae = ConditionalVAE((2, 3, 3), num_classes=4, z_dim=5, hidden=(16,),
                         likelihood=likelihood).double()
    with torch.no_grad():
        vae.prior_mu.normal_()
        vae.prior_logvar.normal_(std=0.3)
        if likelihood == "gaussian":
            vae.log_scale.fill_(-0.4)
    x = torch.rand(6, 2, 3, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    eps = torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close(vae.elbo(x, y, eps)["elbo"], _oracle_elbo(vae, x, y, eps))


def test_negative_elbo_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    protos = torch.rand(3, 30).round()
    y = torch.arange(3).repeat(20)
    x = (0.9 * protos[y] + 0.05).clamp(0, 1)
    vae = ConditionalVAE((30,), num_classes=3, z_dim=4, hidden=(32,))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    eps = torch.randn(60, 4)
    start = -vae.elbo(x, y, eps)["elbo"].mean().item()
    for _ in range(150):
        loss = vae.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = -vae.elbo(x, y, eps)["elbo"].mean().item()
    assert end < 0.6 * start
    # Its class-conditional samples look like their class prototypes.
    samples = vae.sample(torch.arange(3).repeat_interleave(10), torch.Generator().manual_seed(0))
    assert samples.shape == (30, 30) and samples.min() >= 0 and samples.max() <= 1
    err = (samples - protos.repeat_interleave(10, 0)).abs().mean()
    assert err < 0.2


def test_seeded_sampling_is_reproducible():
    vae = ConditionalVAE((4, 4), num_classes=2, z_dim=3, hidden=(8,))
    y = torch.tensor([0, 1, 1])
    a = vae.sample(y, torch.Generator().manual_seed(3))
    b = vae.sample(y, torch.Generator().manual_seed(3))
    assert a.shape == (3, 4, 4) and torch.equal(a, b)


def test_unknown_likelihood_is_refused():
    with pytest.raises(ConfigError, match="bernoulli"):
        ConditionalVAE((4,), 2, likelihood="bernouli")


def test_copied_conditions_encode_decode_and_sample_as_their_source():
    torch.manual_seed(0)
    vae = ConditionalVAE((7,), num_classes=5, z_dim=3, hidden=(8, 6), likelihood="gaussian")
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    vae.copy_conditions(torch.tensor([0, 1]), torch.tensor([3, 4]))
    x, z = torch.randn(4, 7), torch.randn(4, 3)
    src, dst = torch.tensor([0, 1, 0, 1]), torch.tensor([3, 4, 3, 4])
    # Equal up to the summation order (the one-hot sits in another input column).
    for a, b in zip(vae.encode(x, src), vae.encode(x, dst)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(vae.decode(z, src), vae.decode(z, dst), rtol=0, atol=1e-6)
    torch.testing.assert_close(vae.sample(src, torch.Generator().manual_seed(1)),
                               vae.sample(dst, torch.Generator().manual_seed(1)), rtol=0,
                               atol=1e-6)
    # Conditions 0-2 and every weight not tied to a condition are untouched.
    after = dict(vae.named_parameters())
    assert torch.equal(after["prior_mu"][:3], before["prior_mu"][:3])
    assert torch.equal(after["encoder.0.weight"][:, :7 + 3], before["encoder.0.weight"][:, :7 + 3])
    assert torch.equal(after["decoder.0.weight"][:, :3 + 3], before["decoder.0.weight"][:, :3 + 3])
    for name in ("encoder.0.bias", "decoder.2.weight", "log_scale"):
        assert torch.equal(after[name], before[name])
