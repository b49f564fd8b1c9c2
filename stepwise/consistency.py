"""The consistency phenomenon (Xu et al., arXiv 2404.07946): different models map the same noise to similar samples.

Samples of two models are compared pairwise (sample i of model A against sample i of model B, both started from
the same x_T and given the same per-step noise by `sampling.fixed_noise`) by pixel MSE, SSIM and a feature-space
distance. `switch_model(a, b, s)` follows model a for t >= s and model b below, so comparing its samples with model
a's measures how much of the final image is still undecided once the trajectory splits at step s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from .diffusion import Diffusion
from .errors import ConfigError, DataError
from .io import write_json
from .router import ExpertRouter
from .sampling import generate, to_uint8

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def check_pairs(a: torch.Tensor, b: torch.Tensor) -> None:
    """DataError unless a and b are image batches (N, C, H, W) of one shape."""
    if a.dim() != 4 or a.shape != b.shape:
        raise DataError(f"sample batches must both be (N, C, H, W) of one shape, got {tuple(a.shape)} and "
                        f"{tuple(b.shape)}")


def pixel_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pair mean squared pixel difference (arXiv 2404.07946, consistency probe): (N,)."""
    check_pairs(a, b)
    return (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (N,)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian window, default 11x11, sigma 1.5 (Wang et al. 2004, IEEE TIP, Sec. III-C): (k, k)."""
    if size < 1 or size % 2 == 0 or sigma <= 0:
        raise ConfigError(f"SSIM window needs an odd size >= 1 and sigma > 0, got size={size}, sigma={sigma}")
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2  # (size,)
    g = torch.exp(-x * x / (2 * sigma * sigma))  # (size,)
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def ssim(a: torch.Tensor, b: torch.Tensor, value_range: tuple = (-1.0, 1.0), window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-pair mean SSIM (Wang et al. 2004, IEEE TIP 13(4), Eq. 13): (N,).

    SSIM = (2 mu_a mu_b + C1)(2 cov_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2)) with local statistics
    from a Gaussian window ('valid' positions only, as in the reference code), C1 = (k1 L)^2, C2 = (k2 L)^2 and
    L = value_range[1] - value_range[0] (2 for [-1, 1] samples, 1 for [0, 1]); averaged over positions and channels.
    """
    check_pairs(a, b)
    lo, hi = value_range
    if hi <= lo:
        raise ConfigError(f"value_range={value_range} must be (low, high) with high > low")
    C, H, W = a.shape[1:]
    if window_size > min(H, W):
        raise ConfigError(f"SSIM window_size={window_size} exceeds the image size {H}x{W}; pass a smaller odd size")
    L = hi - lo
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    w = gaussian_window(window_size, sigma).to(a.device).expand(C, 1, window_size, window_size)  # (C, 1, k, k)
    x, y = a.double(), b.double()  # (N, C, H, W)
    blur = lambda z: F.conv2d(z, w, groups=C)  # noqa: E731  (N, C, H-k+1, W-k+1)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    smap = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return smap.flatten(1).mean(1)  # (N,)


def feature_distance(a: torch.Tensor, b: torch.Tensor, feature_fn: FeatureFn) -> torch.Tensor:
    """Per-pair L2 distance between features feature_fn(a_i) and feature_fn(b_i) (perceptual proxy for LPIPS): (N,)."""
    check_pairs(a, b)
    with torch.no_grad():
        fa, fb = feature_fn(a).double(), feature_fn(b).double()  # (N, D)
    return (fa - fb).flatten(1).norm(dim=1)  # (N,)


def featnet_feature_fn(net: nn.Module) -> FeatureFn:
    """A feature function for [-1, 1] samples from a FeatNet (whose .features takes uint8 images)."""
    net.eval()
    return lambda x: net.features(to_uint8(x).to(next(net.parameters()).device)).cpu()


def summary(values: torch.Tensor) -> tuple[float, float]:
    """(mean, standard deviation) of a 1-D tensor as floats (std 0 for a single value)."""
    return float(values.mean()), float(values.std()) if len(values) > 1 else 0.0


def consistency_report(samples_a: torch.Tensor, samples_b: torch.Tensor, feature_fn: FeatureFn | None = None,
                       value_range: tuple = (-1.0, 1.0), window_size: int = 11) -> dict:
    """Pairwise consistency metrics of two sample batches (arXiv 2404.07946): JSON-able dict of floats.

    Keys: num, mse/mse_std, ssim/ssim_std and, with feature_fn, feature_l2/feature_l2_std (mean/std over pairs).
    Identical samples give mse 0, ssim 1, feature_l2 0.
    """
    mse_mean, mse_std = summary(pixel_mse(samples_a, samples_b))
    ssim_mean, ssim_std = summary(ssim(samples_a, samples_b, value_range, window_size))
    report = {"num": len(samples_a), "mse": mse_mean, "mse_std": mse_std, "ssim": ssim_mean, "ssim_std": ssim_std}
    if feature_fn is not None:
        report["feature_l2"], report["feature_l2_std"] = summary(feature_distance(samples_a, samples_b, feature_fn))
    return report


def switch_model(model_a: nn.Module, model_b: nn.Module, split_t: int) -> ExpertRouter:
    """A denoiser that is model_a for t >= split_t and model_b for t < split_t (trajectory split at split_t)."""
    if split_t < 0:
        raise ConfigError(f"split_t={split_t} must be >= 0")
    if split_t == 0:
        return ExpertRouter([], [], fallback=model_a)
    return ExpertRouter([model_b], [(0, split_t)], fallback=model_a)


def split_consistency(model_a: nn.Module, model_b: nn.Module, diffusion: Diffusion, split_ts, num: int,
                      shape: tuple, feature_fn: FeatureFn | None = None, window_size: int = 11,
                      **generate_kwargs) -> list[dict]:
    """Consistency of model_a's samples with switch_model(a, b, s)'s, for each split step s: [{split_t, **report}].

    All runs share the seed, hence x_T and the per-step noise. split_t = 0 reproduces model_a (report of identical
    samples); split_t >= T is model_b throughout (the plain two-model consistency of arXiv 2404.07946).
    """
    if not split_ts:
        raise ConfigError("split_consistency needs at least one split timestep")
    generate_kwargs.setdefault("progress", False)
    reference = generate(model_a, diffusion, num, shape, **generate_kwargs)  # (num, C, H, W)
    rows = []
    for s in split_ts:
        samples = generate(switch_model(model_a, model_b, int(s)), diffusion, num, shape, **generate_kwargs)
        rows.append({"split_t": int(s), **consistency_report(reference, samples, feature_fn, window_size=window_size)})
    return rows



EXTRAS_FORMAT = "stepwise-consistency-extras/1"


def check_sample_sets(sets: dict[str, torch.Tensor], num_samples: int, window_size: int) -> None:
    """ConfigError unless every uint8 sample set (N, C, H, W) holds num_samples samples and the images fit the SSIM
    window (tdc.consistency.num_samples, window_size)."""
    smallest = min(len(s) for s in sets.values())
    if num_samples > smallest:
        raise ConfigError(f"tdc.consistency.num_samples={num_samples} exceeds the {smallest} evaluation samples "
                          f"(eval.num_samples); lower it")
    height, width = next(iter(sets.values())).shape[2:]
    if min(height, width) < window_size:
        raise ConfigError(f"tdc.consistency.window_size={window_size} exceeds the image size {height}x{width}")


def write_extras_index(root, extra_models: dict) -> None:
    """<root>/extras.json: the extra models trained for the comparison, each at <root>/<name>/model.pt with its spec."""
    write_json({"format": EXTRAS_FORMAT, "models": {name: {"path": f"{name}/model.pt", **spec}
                                                    for name, spec in extra_models.items()}}, Path(root) / "extras.json")
