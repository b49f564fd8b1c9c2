"""Evaluating denoisers the way the evaluate stages do: sampling with the `sample` settings (the same x_T and
per-step noise for every model), FID/KID/PR against the test split in FeatNet features (and Inception-v3's when its
weights are found), reuse of scores an earlier stage stored, and wall-clock sampling throughput.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from .artifacts import load_samples, save_samples
from .errors import ConfigError, DataError
from .fidelity import (INCEPTION_WEIGHTS, extract_features, feature_difference_intervals, feature_intervals,
                       fidelity_metrics, find_inception_weights, real_fid_floor, real_subset)
from .sampling import generate, to_uint8
from .seeding import derive_seed
from .visualise import save_grid

log = logging.getLogger(__name__)
FLOOR_STREAM = 1  # derive_seed(eval.featnet.seed, FLOOR_STREAM) draws the FID floor's train subset


def amp_dtype(device: torch.device):
    """bf16 autocast for sampling on CUDA, none elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


def sample(model, diffusion, shape, scfg, num: int, device, progress: bool = True) -> torch.Tensor:
    """`num` uint8 samples (N, C, H, W) of `model` drawn with the sample settings `scfg` (a SampleConfig)."""
    return to_uint8(generate(model.to(device), diffusion.to(device), num, shape, sampler=scfg.sampler,
                             steps=scfg.steps, eta=scfg.eta, seed=scfg.seed, batch_size=scfg.batch_size,
                             device=device, amp_dtype=amp_dtype(device), progress=progress))


def grid_title(model_name: str, meta: dict, scfg) -> str:
    """A sample grid's title: which model, how long it trained, how it was sampled."""
    trained = f", {meta['steps']} training steps" if isinstance(meta.get("steps"), int) else ""
    return f"{model_name}{trained}; {scfg.sampler}, {scfg.steps} sampling steps, seed {scfg.seed}"


def sample_and_save(model, diffusion, shape, scfg, num: int, device, out,
                    title: str | None = None) -> tuple[torch.Tensor, float]:
    """`sample`, then write <out>/samples.pt and <out>/grid.png titled `title`: (uint8 images, sampling seconds)."""
    t0 = time.time()
    images = sample(model, diffusion, shape, scfg, num, device)  # (N, C, H, W) uint8
    seconds = time.time() - t0
    save_samples(images, scfg, Path(out) / "samples.pt")
    save_grid(images[: scfg.grid_size**2], Path(out) / "grid.png", nrow=scfg.grid_size, title=title)
    return images, seconds


def floor_subset(num_train: int, ecfg) -> torch.Tensor:
    """Indices of the eval.num_samples train images the FID floor compares with the test split; ConfigError if the
    train split has fewer."""
    return real_subset(num_train, ecfg.num_samples, derive_seed(ecfg.featnet.seed, FLOOR_STREAM))


def featnet_fid_floor(train_images: torch.Tensor, test_images: torch.Tensor, subset: torch.Tensor, featnet,
                      device) -> float:
    """fid_featnet_floor: FID between train_images[subset] and the test split in FeatNet features, what a generator
    of perfect samples scores at the evaluation's sample count (the noise floor of fid_featnet)."""
    return real_fid_floor(train_images, test_images, subset, extractor="featnet", weights_path=featnet,
                          cuda=device.type == "cuda")


def inception_weights(ecfg) -> Path | None:
    """eval.inception resolved (`find_inception_weights`); says once in the log when the *_inception metrics are
    skipped for want of the weights."""
    path = find_inception_weights(ecfg.inception)
    if path is None:
        log.info("Inception-v3 weights (%s) not found: skipping *_inception metrics. Set eval.inception to the file's "
                 "path, or place it in the torch hub cache, to compute them.", INCEPTION_WEIGHTS)
    return path


def scores(images: torch.Tensor, test_images: torch.Tensor, ecfg, featnet, inception, device) -> dict:
    """eval's FID/KID/PR of uint8 samples against the test images in FeatNet features, each with its 95 % bootstrap
    interval over samples (`<metric>_featnet_lo` / `_hi`, eval.bootstrap resamples; KID is then the all-pairs
    estimate), and Inception's point values if its weights are given."""
    kw = dict(fid=ecfg.fid, kid=ecfg.kid, prc=ecfg.prc, kid_subset_size=ecfg.kid_subset_size,
              cuda=device.type == "cuda")
    if ecfg.bootstrap:
        fake, real = (featnet_features(x, featnet, device) for x in (images, test_images))
        out = {}
        for name, iv in feature_intervals(fake, real, n_boot=ecfg.bootstrap, fid=ecfg.fid, kid=ecfg.kid,
                                          prc=ecfg.prc).items():
            out.update({f"{name}_featnet": iv.estimate, f"{name}_featnet_lo": iv.lo, f"{name}_featnet_hi": iv.hi})
    else:
        out = fidelity_metrics(images, test_images, extractor="featnet", weights_path=featnet, **kw)
    if inception:
        out.update(fidelity_metrics(images, test_images, extractor="inception", weights_path=inception, **kw))
    return out


def stored_scores(samples_path, metrics_path, prefix: str, scfg, num: int, required: str) -> dict | None:
    """A model's scores from an earlier evaluate stage (metrics `<prefix><name>`), or None unless its stored samples
    were drawn with the current (sampler, steps, seed) and number of samples and the scores include `required`."""
    if not Path(samples_path).is_file() or not Path(metrics_path).is_file():
        return None
    try:
        images = load_samples(samples_path, scfg)
    except (ConfigError, DataError) as e:
        log.info("not reusing %s: %s", samples_path, e)
        return None
    if len(images) != num:
        log.info("not reusing %s: %d samples, eval.num_samples=%d", samples_path, len(images), num)
        return None
    metrics = json.loads(Path(metrics_path).read_text())
    found = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
    return found if required in found else None


def throughput(models: dict, diffusion, shape, scfg, samples: int, repeats: int, device) -> dict:
    """Images/s of each model: `samples` images at batch min(sample.batch_size, samples), `repeats` repeats
    interleaved across the models, the fastest repeat kept."""
    batch = min(scfg.batch_size, samples)
    best = {name: math.inf for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            generate(model.to(device), diffusion.to(device), samples, shape, sampler=scfg.sampler, steps=scfg.steps,
                     eta=scfg.eta, seed=scfg.seed, batch_size=batch, device=device, progress=False,
                     amp_dtype=amp_dtype(device))  # returns on the CPU: synced
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: samples / seconds for name, seconds in best.items()}


def featnet_features(images: torch.Tensor, featnet, device) -> torch.Tensor:
    """FeatNet features (N, D) float64 of uint8 images (N, C, H, W)."""
    return extract_features(images, extractor="featnet", weights_path=featnet, cuda=device.type == "cuda")


def delta_intervals(images: dict[str, torch.Tensor], test_images: torch.Tensor, model: str, others, ecfg, featnet,
                    device) -> dict:
    """95 % bootstrap intervals over samples of metric(model) - metric(other) in FeatNet features, for each other
    model: {'delta_<model>_vs_<other>/<metric>_featnet_lo' | '_hi'}; {} with eval.bootstrap = 0."""
    if not ecfg.bootstrap:
        return {}
    feats = {name: featnet_features(x, featnet, device) for name, x in images.items()}
    real = featnet_features(test_images, featnet, device)
    out = {}
    for other in others:
        for name, iv in feature_difference_intervals(feats[model], feats[other], real, n_boot=ecfg.bootstrap,
                                                     fid=ecfg.fid, kid=ecfg.kid, prc=ecfg.prc).items():
            key = f"delta_{model}_vs_{other}/{name}_featnet"
            out.update({f"{key}_lo": iv.lo, f"{key}_hi": iv.hi})
    return out


def score_deltas(scores: dict[str, dict], model: str, others) -> dict:
    """{'delta_<model>_vs_<other>/<metric>': scores[model][metric] - scores[other][metric]} for each other model and
    each metric both have (lower FID/KID is better: a negative delta favours `model`)."""
    return {f"delta_{model}_vs_{other}/{k}": v - scores[other][k] for other in others
            for k, v in scores[model].items() if k in scores[other] and not k.endswith(("_lo", "_hi"))}
