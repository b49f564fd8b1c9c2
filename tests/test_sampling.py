import torch

from stepwise.diffusion import Diffusion
from stepwise.sampling import NOISE_BLOCK, fixed_noise, generate, timestep_subsequence, to_uint8


def test_fixed_noise_independent_of_batching():
    shape = (1, 4, 4)
    whole = fixed_noise(3, 5, 0, 150, shape)  # (150, 1, 4, 4)
    parts = torch.cat([fixed_noise(3, 5, s, n, shape) for s, n in ((0, 7), (7, NOISE_BLOCK), (7 + NOISE_BLOCK, 79))])
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)
    assert not torch.equal(fixed_noise(3, 5, 0, 10, shape), fixed_noise(3, 6, 0, 10, shape))
    assert not torch.equal(fixed_noise(3, 5, 0, 10, shape), fixed_noise(4, 5, 0, 10, shape))


def test_subsequence():
    assert timestep_subsequence(1000, 4).tolist() == [999, 666, 333, 0]
    assert timestep_subsequence(10, 10).tolist() == list(range(9, -1, -1))


def oracle_x0(target):
    """An x0-recovering 'model' for eps prediction: returns the eps that maps x_t back to `target`."""
    d = Diffusion("linear", 100, "eps")

    def model(x, t):
        a, s = d.coefs(t, x)
        return (x - a * target[: len(x)]) / s

    return d, model


def test_ddim_with_oracle_recovers_target():
    target = torch.rand(5, 1, 4, 4) * 2 - 1
    d, model = oracle_x0(target)
    out = generate(model, d, 5, (1, 4, 4), sampler="ddim", steps=10, seed=0, batch_size=8, progress=False)
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)


def test_ddpm_is_seeded_and_batch_independent():
    d = Diffusion("linear", 50, "eps")
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    a = generate(model, d, 70, (1, 4, 4), sampler="ddpm", steps=20, seed=1, batch_size=64, progress=False)
    b = generate(model, d, 70, (1, 4, 4), sampler="ddpm", steps=20, seed=1, batch_size=128, progress=False)
    c = generate(model, d, 70, (1, 4, 4), sampler="ddpm", steps=20, seed=2, batch_size=64, progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(a, c)


def test_to_uint8():
    assert to_uint8(torch.tensor([-1.5, -1.0, 0.0, 1.0])).tolist() == [0, 0, 128, 255]
