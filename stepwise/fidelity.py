"""FID / KID / precision-recall through torch-fidelity, in the feature space of FeatNet or of Inception-v3.

Metric names carry the extractor: `fid_featnet`, `kid_featnet`, ..., `fid_inception`. Needs torch-fidelity
(imported here only, so the rest of the library stays importable with torch alone).

`fidelity_metrics` runs torch-fidelity end to end. `fidelity_intervals` extracts the same features once and computes
the metrics from the feature tensors (`frechet_distance`, `kernel_distance`, `precision_recall`, torch in float64),
with bootstrap percentile intervals over the samples of both sets (stepwise.intervals) at no extra extraction.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from .errors import ConfigError
from .featnet import load_featnet
from .intervals import Interval, percentile_interval, resample_counts

log = logging.getLogger(__name__)
FEATNET_EXTRACTOR = "stepwise-featnet"
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's inception-v3-compat file
PRC_NEIGHBORHOOD = 3  # k of the k-NN balls of precision/recall (torch-fidelity's default, Kynkaanniemi et al. 2019)


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


# extractor -> (torch-fidelity extractor name, feature layer its FID/KID/PR use, repeat gray to RGB)
EXTRACTORS = {"featnet": (FEATNET_EXTRACTOR, "features", False), "inception": ("inception-v3-compat", "2048", True)}


def _extractor(extractor: str) -> tuple[str, str, bool]:
    if extractor not in EXTRACTORS:
        raise ConfigError(f"unknown feature extractor {extractor!r}; valid: {sorted(EXTRACTORS)}")
    return EXTRACTORS[extractor]


def fidelity_metrics(fake: torch.Tensor, real: torch.Tensor, *, extractor: str, weights_path, fid=True, kid=True,
                     prc=True, kid_subset_size=1000, cuda: bool = False, verbose: bool = False) -> dict:
    """FID/KID/PR of uint8 images fake vs real (N, C, H, W) in one extractor's space: {'fid_<tag>': ...}."""
    name, _, rgb = _extractor(extractor)
    tag = extractor
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
                  kid_subset_size: int = 1000, n_boot: int = 0, **sampling) -> dict:
    """fid_featnet (and kid_featnet with `kid`) of `num` samples of `model` drawn by `stepwise.sampling.generate`
    with the keywords `sampling` (sampler, steps, eta, seed, batch_size), against the uint8 test images; with
    n_boot > 0 also 'fid_replicates': `fid_replicates` over samples, seed 0 (the same resampled positions at every
    checkpoint, as `stepwise.intervals.speedup_ci` needs)."""
    from .sampling import generate, to_uint8

    images = to_uint8(generate(model.to(device), diffusion.to(device), num, shape, device=device, progress=False,
                               **sampling))  # (N, C, H, W) uint8
    cuda = torch.device(device).type == "cuda"
    out = fidelity_metrics(images, test_images, extractor="featnet", weights_path=featnet, fid=True, kid=kid,
                           prc=False, kid_subset_size=kid_subset_size, cuda=cuda)
    if n_boot:
        fake, real = (extract_features(x, extractor="featnet", weights_path=featnet, cuda=cuda)
                      for x in (images, test_images))
        out["fid_replicates"] = fid_replicates(fake, real, n_boot=n_boot, seed=0).tolist()
    return out


def fid_curve(model, diffusion, shape, test_images: torch.Tensor, featnet, ckpt_dir, num: int, *, device,
              kid: bool = False, kid_subset_size: int = 1000, n_boot: int = 0, **sampling) -> list[dict]:
    """[{'step', 'fid_featnet'[, 'kid_featnet']}] of the EMA weights of every kept training checkpoint in ckpt_dir,
    oldest first, each scored by `sample_scores` with the same sampling noise; loads them into `model`/`diffusion`.
    StepwiseError if ckpt_dir holds no checkpoint."""
    from .checkpoint import checkpoint_paths, load_checkpoint_ema
    from .errors import StepwiseError

    rows = []
    for path in checkpoint_paths(ckpt_dir):
        step = load_checkpoint_ema(path, model, diffusion)
        rows.append({"step": step, **sample_scores(model, diffusion, shape, test_images, featnet, num, device=device,
                                                   kid=kid, kid_subset_size=kid_subset_size, n_boot=n_boot,
                                                   **sampling)})
        log.info("curve: step %d fid_featnet %.4f", step, rows[-1]["fid_featnet"])
    if not rows:
        raise StepwiseError(f"{ckpt_dir} holds no training checkpoints for the FID curve; rerun the training stage")
    return rows


def extract_features(images: torch.Tensor, *, extractor: str, weights_path, cuda: bool = False,
                     verbose: bool = False, batch_size: int = 256) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> the features torch-fidelity's FID/KID/PR use in that space, float64 (N, D)."""
    name, layer, rgb = _extractor(extractor)
    net = create_feature_extractor(name, [layer], cuda=cuda, verbose=verbose,
                                   feature_extractor_weights_path=str(weights_path) if weights_path else None)
    feats = get_featuresdict_from_dataset(ImageTensorDataset(images, rgb), net, batch_size, cuda, True, verbose)
    return feats[layer].double()  # (N, D)


def _weights(counts: torch.Tensor | None, n: int) -> torch.Tensor:
    """Bootstrap multiplicities (B, n), or one row of ones for the sample itself."""
    return torch.ones(1, n, dtype=torch.float64) if counts is None else counts.to(torch.float64)


def _moments(x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (B, D) and unbiased covariance (B, D, D) of rows x (N, D), row i repeated counts[b, i] times."""
    n = counts.sum(1)  # (B,)
    x0 = x.mean(0)  # (D,) shift for numerical accuracy; the covariance does not depend on it
    xc = x - x0  # (N, D)
    mu = counts @ xc / n[:, None]  # (B, D)
    second = torch.stack([(xc * c[:, None]).T @ xc for c in counts])  # (B, D, D)
    cov = (second - n[:, None, None] * mu[:, :, None] * mu[:, None, :]) / (n - 1)[:, None, None]  # (B, D, D)
    return mu + x0, cov


def frechet_distance(fake: torch.Tensor, real: torch.Tensor, fake_counts: torch.Tensor | None = None,
                     real_counts: torch.Tensor | None = None) -> torch.Tensor:
    """FID = |mu_f - mu_r|^2 + tr(S_f + S_r - 2 (S_f S_r)^(1/2)) (Heusel et al. 2017, arXiv 1706.08500, Eq. 6).

    fake (Nf, D), real (Nr, D) features; optional bootstrap multiplicities (B, Nf) / (B, Nr) give one value per
    resample. tr (S_f S_r)^(1/2) is the sum of the square roots of the eigenvalues of S_f^(1/2) S_r S_f^(1/2) (the
    same as those of S_f S_r), from symmetric eigendecompositions in float64. Returns (B,) (B = 1 without counts).
    """
    fake, real = fake.double(), real.double()
    mu_f, s_f = _moments(fake, _weights(fake_counts, len(fake)))  # (B, D), (B, D, D)
    mu_r, s_r = _moments(real, _weights(real_counts, len(real)))
    lam, vec = torch.linalg.eigh(s_f)  # (B, D), (B, D, D)
    root = vec @ (lam.clamp(min=0).sqrt()[..., None] * vec.mT)  # S_f^(1/2) (B, D, D)
    inner = root @ s_r @ root  # (B, D, D)
    tr_covmean = torch.linalg.eigvalsh((inner + inner.mT) / 2).clamp(min=0).sqrt().sum(-1)  # (B,)
    trace = s_f.diagonal(dim1=-2, dim2=-1).sum(-1) + s_r.diagonal(dim1=-2, dim2=-1).sum(-1)  # (B,)
    return ((mu_f - mu_r) ** 2).sum(-1) + trace - 2 * tr_covmean  # (B,)


def _poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KID's kernel k(a, b) = (a.b / D + 1)^3 (Binkowski et al. 2018, arXiv 1801.01401, Sec. 3): (Na, Nb)."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def _kernel_mean(x, y, cx, cy, same: bool, block: int = 1024) -> torch.Tensor:
    """Mean of k over the pairs of two resampled sets (B,); same=True: one set, pairs of a row with itself left out."""
    total = 0
    for i in range(0, len(x), block):
        k = _poly_kernel(x[i : i + block], y)  # (b, Ny)
        total = total + ((cx[:, i : i + block] @ k) * cy).sum(1)  # (B,)
    if not same:
        return total / (cx.sum(1) * cy.sum(1))
    diag = ((x * x).sum(1) / x.shape[1] + 1) ** 3  # (N,) k(x_i, x_i)
    n, sq = cx.sum(1), (cx**2).sum(1)
    return (total - (cx**2) @ diag) / (n * n - sq)


def kernel_distance(fake: torch.Tensor, real: torch.Tensor, fake_counts: torch.Tensor | None = None,
                    real_counts: torch.Tensor | None = None) -> torch.Tensor:
    """KID: the unbiased MMD^2 with the cubic polynomial kernel (Binkowski et al. 2018, arXiv 1801.01401, Eq. 4).

    Over all pairs of the two sets, which is the expectation of torch-fidelity's subset-averaged KID (equal to it
    when kid_subset_size >= both set sizes). With bootstrap multiplicities (B, N) a resample's copies of one row
    count as that row, so only pairs of distinct rows enter the within-set terms. Returns (B,).
    """
    fake, real = fake.double(), real.double()
    cf, cr = _weights(fake_counts, len(fake)), _weights(real_counts, len(real))
    return (_kernel_mean(fake, fake, cf, cf, True) + _kernel_mean(real, real, cr, cr, True)
            - 2 * _kernel_mean(fake, real, cf, cr, False))


def _neighbours(x: torch.Tensor, m: int, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (N, m) ascending and indices (N, m) of each row's m nearest other rows."""
    dists, idx = [], []
    for i in range(0, len(x), block):
        d = torch.cdist(x[i : i + block], x)  # (b, N)
        rows = torch.arange(len(d))
        d[rows, rows + i] = torch.inf  # a row is not its own neighbour
        top = d.topk(m, dim=1, largest=False)
        dists.append(top.values)
        idx.append(top.indices)
    return torch.cat(dists), torch.cat(idx)


def _radii(nn_dist: torch.Tensor, nn_idx: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row of a resample (copies counted), (B, N).

    Uses each row's m precomputed nearest neighbours; should fewer than k copies fall among them (probability about
    exp(-m) per row) the radius is the m-th distance, an upper bound.
    """
    out = []
    for c in counts.split(16):  # (b, N) chunks bound the (b, N, m) multiplicities
        reached = c[:, nn_idx].cumsum(-1) < k  # (b, N, m)
        pos = reached.sum(-1).clamp(max=nn_dist.shape[1] - 1)  # (b, N) index of the k-th neighbour
        out.append(nn_dist.expand(len(c), -1, -1).gather(2, pos[..., None])[..., 0])  # (b, N)
    return torch.cat(out)


def _coverage(query, support, cq, cs, k: int, block: int = 1024) -> torch.Tensor:
    """Share of the (resampled) query rows inside the k-NN ball of at least one present support row: (B,)."""
    m = min(max(32, 8 * k), len(support) - 1)
    nn_dist, nn_idx = _neighbours(support, m)  # (Ns, m)
    radius = _radii(nn_dist, nn_idx, cs, k)  # (B, Ns)
    q_idx, s_idx, d_pair = [], [], []  # candidate pairs: within the largest radius a support row can have
    for i in range(0, len(query), block):
        d = torch.cdist(query[i : i + block], support)  # (b, Ns)
        q, s = torch.nonzero(d <= nn_dist[:, -1], as_tuple=True)
        q_idx.append(q + i)
        s_idx.append(s)
        d_pair.append(d[q, s])
    q_idx, s_idx, d_pair = torch.cat(q_idx), torch.cat(s_idx), torch.cat(d_pair)  # (P,)
    covered = []
    for c_s, r in zip(cs.expand(len(radius), -1).split(16), radius.split(16)):
        inside = ((c_s[:, s_idx] > 0) & (d_pair <= r[:, s_idx])).to(torch.float64)  # (b, P)
        covered.append(torch.zeros(len(r), len(query), dtype=torch.float64).index_add_(1, q_idx, inside) > 0)
    covered = torch.cat(covered).to(torch.float64)  # (B, Nq)
    return (cq * covered).sum(1) / cq.sum(1)


def precision_recall(fake: torch.Tensor, real: torch.Tensor, fake_counts: torch.Tensor | None = None,
                     real_counts: torch.Tensor | None = None, k: int = PRC_NEIGHBORHOOD) -> tuple[torch.Tensor, ...]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, arXiv 1904.06991, Eqs. 1-3), each (B,).

    precision: share of fake rows inside the ball of some real row whose radius is its distance to its k-th nearest
    real row; recall: the same with the roles swapped. With bootstrap multiplicities (B, N) copies of a row are not
    its own neighbours (a resample's duplicates would otherwise shrink every ball to zero).
    """
    fake, real = fake.double(), real.double()
    cf, cr = _weights(fake_counts, len(fake)), _weights(real_counts, len(real))
    return _coverage(fake, real, cf, cr, k), _coverage(real, fake, cr, cf, k)


def feature_replicates(fake: torch.Tensor, real: torch.Tensor, fake_counts: torch.Tensor | None = None,
                       real_counts: torch.Tensor | None = None, *, fid: bool = True, kid: bool = True,
                       prc: bool = True) -> dict[str, torch.Tensor]:
    """{'fid', 'kid', 'precision', 'recall', 'f_score'} of features fake vs real, each (B,) (B = 1 without counts)."""
    out = {}
    if fid:
        out["fid"] = frechet_distance(fake, real, fake_counts, real_counts)
    if kid:
        out["kid"] = kernel_distance(fake, real, fake_counts, real_counts)
    if prc:
        p, r = precision_recall(fake, real, fake_counts, real_counts)
        out.update(precision=p, recall=r, f_score=2 * p * r / (p + r).clamp(min=1e-5))  # torch-fidelity's F-score
    return out


def fid_replicates(fake: torch.Tensor, real: torch.Tensor, *, n_boot: int = 200, seed: int = 0) -> torch.Tensor:
    """Bootstrap replicates (n_boot,) of the FID of features fake vs real, shifted to average the point FID.

    For stepwise.intervals.speedup_ci: use the same seed at every checkpoint so that replicate j resamples the same
    sample positions at every step.
    """
    _check_sets(fake, real)
    gen = torch.Generator().manual_seed(seed)
    reps = frechet_distance(fake, real, resample_counts(len(fake), n_boot, gen), resample_counts(len(real), n_boot, gen))
    return reps + (frechet_distance(fake, real) - reps.mean())  # (n_boot,)


def _check_sets(*sets: torch.Tensor) -> None:
    for x in sets:
        if x.dim() != 2 or len(x) < 2:
            raise ConfigError(f"features must be (N >= 2, D), got {tuple(x.shape)}")
    if len({x.shape[1] for x in sets}) != 1:
        raise ConfigError(f"feature sets differ in dimension: {[tuple(x.shape) for x in sets]}")


def feature_intervals(fake: torch.Tensor, real: torch.Tensor, *, n_boot: int = 200, alpha: float = 0.05,
                      seed: int = 0, fid: bool = True, kid: bool = True, prc: bool = True) -> dict[str, Interval]:
    """Each metric of features fake (Nf, D) vs real (Nr, D) with a bootstrap interval over the rows of both sets.

    Centered percentile intervals (stepwise.intervals.percentile_interval): plain percentile intervals of FID and
    precision/recall miss the metric's expected value at this sample count most of the time, because resamples
    with duplicated rows shift them (Gaussian features, 300 vs 600 rows: 46 % and 16 % coverage for FID and recall
    at nominal 95 %; centered: 96-100 %).
    """
    _check_sets(fake, real)
    gen = torch.Generator().manual_seed(seed)
    cf, cr = resample_counts(len(fake), n_boot, gen), resample_counts(len(real), n_boot, gen)
    point = feature_replicates(fake, real, fid=fid, kid=kid, prc=prc)
    reps = feature_replicates(fake, real, cf, cr, fid=fid, kid=kid, prc=prc)
    return {k: percentile_interval(float(point[k]), reps[k], alpha, centered=True) for k in point}


def feature_difference_intervals(fake_a: torch.Tensor, fake_b: torch.Tensor, real: torch.Tensor, *,
                                 n_boot: int = 200, alpha: float = 0.05, seed: int = 0, fid: bool = True,
                                 kid: bool = True, prc: bool = True) -> dict[str, Interval]:
    """metric(a vs real) - metric(b vs real) with centered intervals: a, b resampled apart, the shared real set once."""
    _check_sets(fake_a, fake_b, real)
    gen = torch.Generator().manual_seed(seed)
    ca, cb = resample_counts(len(fake_a), n_boot, gen), resample_counts(len(fake_b), n_boot, gen)
    cr = resample_counts(len(real), n_boot, gen)
    kw = dict(fid=fid, kid=kid, prc=prc)
    pa, pb = feature_replicates(fake_a, real, **kw), feature_replicates(fake_b, real, **kw)
    ra, rb = feature_replicates(fake_a, real, ca, cr, **kw), feature_replicates(fake_b, real, cb, cr, **kw)
    return {k: percentile_interval(float(pa[k] - pb[k]), ra[k] - rb[k], alpha, centered=True) for k in pa}


def fidelity_intervals(fake: torch.Tensor, real: torch.Tensor, *, extractor: str, weights_path, n_boot: int = 200,
                       alpha: float = 0.05, seed: int = 0, fid: bool = True, kid: bool = True, prc: bool = True,
                       cuda: bool = False, verbose: bool = False) -> dict:
    """Metrics of uint8 images fake vs real (N, C, H, W) with bootstrap intervals over samples, features extracted once.

    Returns {'fid_<tag>': ..., 'fid_<tag>_lo': ..., 'fid_<tag>_hi': ..., 'kid_<tag>' ...} at level 1 - alpha. KID is
    the all-pairs estimate (see kernel_distance). Inception features are 2048-d: each FID resample then costs a
    2048 x 2048 eigendecomposition, so keep n_boot small there on a CPU.
    """
    feats = [extract_features(x, extractor=extractor, weights_path=weights_path, cuda=cuda, verbose=verbose)
             for x in (fake, real)]
    out = {}
    for name, iv in feature_intervals(*feats, n_boot=n_boot, alpha=alpha, seed=seed, fid=fid, kid=kid,
                                      prc=prc).items():
        out.update({f"{name}_{extractor}": iv.estimate, f"{name}_{extractor}_lo": iv.lo,
                    f"{name}_{extractor}_hi": iv.hi})
    return out


def real_subset(num_train: int, num_samples: int, seed: int) -> torch.Tensor:
    """Indices of a seeded subset of num_samples train images (the evaluation's sample count); ConfigError if too few."""
    if not 2 <= num_samples <= num_train:
        raise ConfigError(f"eval.num_samples={num_samples} must lie in [2, {num_train}] (the train split's size) for "
                          "the real-vs-real FID floor")
    return torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))[:num_samples]


def real_fid_floor(train_images: torch.Tensor, test_images: torch.Tensor, subset: torch.Tensor, *, extractor: str,
                   weights_path, cuda: bool = False) -> float:
    """FID between train_images[subset] and the test split: what a generator of perfect data samples would score.

    Real-vs-real at the evaluation's sample count, so it is the noise floor of fid_<extractor> in that setting.
    """
    feats = [extract_features(x, extractor=extractor, weights_path=weights_path, cuda=cuda)
             for x in (train_images[subset], test_images)]
    return float(frechet_distance(*feats))
