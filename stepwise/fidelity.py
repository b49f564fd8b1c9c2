"""FID / KID / precision-recall through torch-fidelity, in the feature space of FeatNet or of Inception-v3.

Metric names carry the extractor: `fid_featnet`, `kid_featnet`, ..., `fid_inception`. Needs torch-fidelity
(imported here only, so the rest of the library stays importable with torch alone).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from .errors import ConfigError
from .featnet import load_featnet

log = logging.getLogger(__name__)
FEATNET_EXTRACTOR = "stepwise-featnet"
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's inception-v3-compat file


class FeatNetExtractor(FeatureExtractorBase):
    """torch-fidelity adapter for a saved FeatNet; `feature_extractor_weights_path` names the featnet file."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net, _ = load_featnet(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return ("features",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return None

    def forward(self, x):
        return (self.net.features(x).double(),)  # (B, feature_dim)


if FEATNET_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(FEATNET_EXTRACTOR, FeatNetExtractor)


class ImageTensorDataset(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) as the bare-tensor dataset torch-fidelity reads; gray repeated to RGB if asked."""

    def __init__(self, images: torch.Tensor, rgb: bool = False):
        self.images, self.rgb = images, rgb

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]  # (C, H, W)
        return x.expand(3, -1, -1) if self.rgb and x.shape[0] == 1 else x


def find_inception_weights(setting: str) -> Path | None:
    """Resolve eval.inception: 'off' -> None; 'auto' -> torch hub cache file if present; else that path (must exist)."""
    if setting == "off":
        return None
    if setting == "auto":
        path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
        return path if path.is_file() else None
    path = Path(setting)
    if not path.is_file():
        raise ConfigError(f"eval.inception={setting!r}: no such file; give the path of {INCEPTION_WEIGHTS}, "
                          "'auto' (torch hub cache) or 'off'")
    torch.load(path, map_location="cpu", weights_only=True)  # refuse anything but plain tensors
    return path


def fidelity_metrics(fake: torch.Tensor, real: torch.Tensor, *, extractor: str, weights_path, fid=True, kid=True,
                     prc=True, kid_subset_size=1000, cuda: bool = False, verbose: bool = False) -> dict:
    """FID/KID/PR of uint8 images fake vs real (N, C, H, W) in one extractor's space: {'fid_<tag>': ...}."""
    if extractor == "featnet":
        name, tag, rgb = FEATNET_EXTRACTOR, "featnet", False
    elif extractor == "inception":
        name, tag, rgb = "inception-v3-compat", "inception", True
    else:
        raise ConfigError(f"unknown feature extractor {extractor!r}; valid: ['featnet', 'inception']")
    subset = min(kid_subset_size, len(fake), len(real))
    out = torch_fidelity.calculate_metrics(
        input1=ImageTensorDataset(fake, rgb), input2=ImageTensorDataset(real, rgb), cuda=cuda, fid=fid, kid=kid,
        prc=prc, feature_extractor=name, feature_extractor_weights_path=str(weights_path) if weights_path else None,
        kid_subset_size=subset, cache=False, verbose=verbose, save_cpu_ram=True, batch_size=256,
    )
    rename = {"frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid",
              "kernel_inception_distance_std": "kid_std", "precision": "precision", "recall": "recall",
              "f_score": "f_score"}
    return {f"{short}_{tag}": float(out[k]) for k, short in rename.items() if k in out}



# ---- FeatNet FID of a model's samples: one point, and the curve over training checkpoints ------------------------


def sample_scores(model, diffusion, shape, test_images: torch.Tensor, featnet, num: int, *, device, kid: bool = False,
                  kid_subset_size: int = 1000, **sampling) -> dict:
    """fid_featnet (and kid_featnet with `kid`) of `num` samples of `model` drawn by `stepwise.sampling.generate`
    with the keywords `sampling` (sampler, steps, eta, seed, batch_size), against the uint8 test images."""
    from .sampling import generate, to_uint8

    images = to_uint8(generate(model.to(device), diffusion.to(device), num, shape, device=device, progress=False,
                               **sampling))  # (N, C, H, W) uint8
    return fidelity_metrics(images, test_images, extractor="featnet", weights_path=featnet, fid=True, kid=kid,
                            prc=False, kid_subset_size=kid_subset_size, cuda=torch.device(device).type == "cuda")


def fid_curve(model, diffusion, shape, test_images: torch.Tensor, featnet, ckpt_dir, num: int, *, device,
              kid: bool = False, kid_subset_size: int = 1000, **sampling) -> list[dict]:
    """[{'step', 'fid_featnet'[, 'kid_featnet']}] of the EMA weights of every kept training checkpoint in ckpt_dir,
    oldest first, each scored by `sample_scores` with the same sampling noise; loads them into `model`/`diffusion`.
    StepwiseError if ckpt_dir holds no checkpoint."""
    from .checkpoint import checkpoint_paths, load_checkpoint_ema
    from .errors import StepwiseError

    rows = []
    for path in checkpoint_paths(ckpt_dir):
        step = load_checkpoint_ema(path, model, diffusion)
        rows.append({"step": step, **sample_scores(model, diffusion, shape, test_images, featnet, num, device=device,
                                                   kid=kid, kid_subset_size=kid_subset_size, **sampling)})
        log.info("curve: step %d fid_featnet %.4f", step, rows[-1]["fid_featnet"])
    if not rows:
        raise StepwiseError(f"{ckpt_dir} holds no training checkpoints for the FID curve; rerun the training stage")
    return rows
