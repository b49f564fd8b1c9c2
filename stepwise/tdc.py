"""TDC stage 2 procedures (arXiv 2312.13307): timestep groups from the difficulty profile, expert fine-tuning on a
group's [lo, hi), the compute-matched continuation of the unified model, the expert ensemble and its accounting.

Expert i is a copy of the unified model (raw or EMA weights, tdc.finetune.init) trained only on t in group i's
[lo, hi); the baseline continues the same copy on all of [0, T) for as many images as all experts together.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .artifacts import load_groups, load_model, load_model_file, save_model, train_sha
from .checkpoint import fingerprint, resume_relevant
from .config import TrainConfig
from .data import load_split, sha256
from .errors import ConfigError, StepwiseError
from .flops import count_macs, example_inputs, training_flops
from .grouping import groups_from_boundaries, interpolate_profile, make_groups, validate_groups
from .models import count_params
from .router import ExpertRouter
from .config import SIMILARITY_SIGNAL
from .timestep_samplers import RangeRecorder
from .training import timestep_sampler_from_config, final_loss, train

# ---- groups (the `cluster` stage) -----------------------------------------------------------------------------


def dp_signal(ccfg, profile: dict, similarity: dict, T: int) -> torch.Tensor:
    """The (T, F) signal the dp method segments: tdc.cluster.signal columns of the profile (SIMILARITY_SIGNAL: the
    rows of the gradient-similarity matrix) interpolated onto every t, z-scored if tdc.cluster.standardise."""
    cols = []
    for name in ccfg.signal:
        if name == SIMILARITY_SIGNAL:
            cols.extend(v for k, v in similarity.items() if k != "t")  # row k of the matrix = column k (symmetric)
        elif name in profile and name != "t":
            cols.append(profile[name])
        else:
            raise ConfigError(f"tdc.cluster.signal: {name!r} is not a profile column; valid: "
                              f"{sorted(k for k in profile if k != 't') + [SIMILARITY_SIGNAL]}")
    x = torch.stack(cols, 1)  # (K, F)
    if not bool(torch.isfinite(x).all()):
        bad = [n for n in ccfg.signal if n != SIMILARITY_SIGNAL and not bool(torch.isfinite(profile[n]).all())]
        raise ConfigError(f"tdc.cluster.signal column(s) {bad} hold non-finite values (e.g. rel_entropy_mc at t=0); "
                          f"choose other columns")
    if ccfg.standardise:
        x = (x - x.mean(0)) / x.std(0, unbiased=False).where(x.std(0, unbiased=False) > 0, torch.ones(1))
    return interpolate_profile(profile["t"], x, T)  # (T, F)


def tdc_groups(ccfg, K: int, T: int, snr_db: torch.Tensor, profile: dict, similarity: dict) -> list[tuple[int, int]]:
    """The K groups of [0, T) for tdc.cluster.method (uniform, equal_snr_db, dp or manual), validated."""
    if ccfg.method == "manual":
        if len(ccfg.boundaries) != K + 1:
            raise ConfigError(f"tdc.cluster.boundaries has {len(ccfg.boundaries)} entries; num_groups={K} needs "
                              f"{K + 1}: [0, b_1, ..., {T}]")
        try:
            return validate_groups(groups_from_boundaries(ccfg.boundaries), T)
        except ConfigError as e:
            raise ConfigError(f"tdc.cluster.boundaries={ccfg.boundaries}: {e}") from None
    if ccfg.method == "equal_snr_db":
        s = snr_db if ccfg.snr_db_range is None else snr_db.clamp(*ccfg.snr_db_range)
        return make_groups("equal_snr_db", T, K, snr_db=s)
    if ccfg.method == "dp":
        return make_groups("dp", T, K, signal=dp_signal(ccfg, profile, similarity, T))
    return make_groups(ccfg.method, T, K)


# ---- expert fine-tuning (`finetune@i`, `continue_unified`) and range-restricted training -------------------------


def range_sampler(cfg: TrainConfig, diffusion, t_range: tuple[int, int]) -> RangeRecorder:
    """The configured timestep sampler restricted to [lo, hi), every t it draws checked and counted."""
    lo, hi = t_range
    return RangeRecorder(timestep_sampler_from_config(cfg, diffusion, t_range=(lo, hi)), lo, hi)


def train_on_range(model, diffusion, images: torch.Tensor, cfg: TrainConfig, sampler: RangeRecorder, ckpt_dir,
                   run_id: str, who: str, log_fn=None, ema_start: dict | None = None) -> dict:
    """Train `model` on t in the sampler's [lo, hi) only (`range_sampler`), resumable from ckpt_dir (its weight EMA
    starting from `ema_start` when given); train()'s result plus 'seen' (the t record) and 'final_loss'."""
    lo, hi = sampler.lo, sampler.hi
    result = train(model, diffusion, images, cfg, ckpt_dir, fingerprint=run_id, sampler=sampler, log_fn=log_fn,
                   ema_start=ema_start)
    seen = sampler.seen()
    if seen["t_draws"] and not (lo <= seen["t_min"] and seen["t_max"] < hi):
        raise StepwiseError(f"{who}: trained on t in [{seen['t_min']}, {seen['t_max']}] outside [{lo}, {hi})")
    return {**result, "seen": seen, "final_loss": final_loss(result["history"])}


@dataclass
class FinetuneJob:
    """Everything a fine-tune of the unified model on [lo, hi) needs, loaded and checked before any training."""

    group: int  # -1: the continued unified baseline
    t_range: tuple[int, int]
    cfg: TrainConfig
    init: str  # "raw" | "ema": which weights of the unified model are fine-tuned
    ema_start: str  # "init" | "ema": the weight EMA starts from the fine-tuned weights or the unified EMA
    model: torch.nn.Module
    diffusion: torch.nn.Module
    sampler: RangeRecorder
    unified: dict  # the unified model file's model and diffusion configs and image shape
    images: torch.Tensor
    data_sha: str
    unified_sha: str
    run_id: str
    macs: int  # per forward of one image
    ema_state: dict | None = None  # the unified EMA weights, when the EMA starts from them but training does not

    @property
    def tags(self) -> dict:
        lo, hi = self.t_range
        return {"fingerprint": self.run_id, "tdc.group": str(self.group), "tdc.t_range": f"[{lo}, {hi})",
                "tdc.role": "baseline" if self.group < 0 else "expert"}


def finetune_job(unified_path, data_dir, cfg: TrainConfig, group: int, t_range: tuple[int, int], init: str,
                 ema_start: str) -> FinetuneJob:
    """Load the unified model (its `init` weights; the EMA starts from those, or from the unified EMA weights with
    ema_start="ema") and the training split, check they fit, fingerprint the run."""
    obj = load_model_file(unified_path)
    unified = {k: v for k, v in obj.items() if k in ("model", "diffusion", "image_shape")}
    model, diffusion, shape, _ = load_model(unified_path, use_ema=init == "ema")
    ema_state = obj["ema_state_dict"] if ema_start == "ema" and init != "ema" else None
    sampler = range_sampler(cfg, diffusion, t_range)
    images, _, _ = load_split(f"{data_dir}/train.pt")
    if tuple(images.shape[1:]) != tuple(shape):
        raise ConfigError(f"{unified_path} was trained on images {list(shape)}, the data are "
                          f"{list(images.shape[1:])}: rerun `dvc repro pretrain`")
    data_sha, unified_sha = train_sha(data_dir), sha256(unified_path)
    start = [init] if ema_state is None else [init, "ema_start=ema"]  # EMA from the init weights: the old identity
    run_id = fingerprint(unified_sha, resume_relevant(cfg), list(t_range), *start, data_sha)
    macs = count_macs(model, example_inputs(shape[0], shape[1]))
    return FinetuneJob(group, tuple(t_range), cfg, init, ema_start, model, diffusion, sampler, unified, images,
                       data_sha, unified_sha, run_id, macs, ema_state)


def run_finetune(job: FinetuneJob, out_dir, who: str, log_fn=None) -> dict:
    """Fine-tune job's model on its range (resumable from out_dir/checkpoints), save out_dir/model.pt with its t
    record and training compute (meta); its metrics."""
    (lo, hi), out = job.t_range, Path(out_dir)
    t0 = time.time()
    result = train_on_range(job.model, job.diffusion, job.images, job.cfg, job.sampler, out / "checkpoints",
                            job.run_id, who, log_fn, ema_start=job.ema_state)
    seconds = time.time() - t0
    images_seen, seen = result["images_seen"], result["seen"]
    flops = training_flops(job.macs, images_seen)
    meta = {"steps": job.cfg.steps, "images_seen": images_seen, "fingerprint": job.run_id, "data_sha256": job.data_sha,
            "unified_sha256": job.unified_sha, "group": job.group, "lo": lo, "hi": hi, "init": job.init,
            "ema_start": job.ema_start,
            "macs_per_forward": job.macs, "train_flops": flops, "num_params": count_params(job.model), **seen}
    save_model(out / "model.pt", model_cfg=job.unified["model"], diffusion_cfg=job.unified["diffusion"],
               image_shape=job.unified["image_shape"], state_dict=result["model"].state_dict(),
               ema_state_dict=result["ema"].state_dict(), diffusion_state=job.diffusion.state_dict(), meta=meta)
    return {"group": job.group, "lo": lo, "hi": hi, "steps": job.cfg.steps, "batch_size": job.cfg.batch_size,
            "images_seen": images_seen, "macs_per_forward": job.macs, "train_flops": flops,
            "final_loss": result["final_loss"], "train_seconds_this_run": seconds,
            "resumed_from_step": result["resumed_from"] or 0, **seen}


def finetune_params(job: FinetuneJob, tdc_finetune, K: int) -> dict:
    """The stage params a fine-tune's MLflow run records."""
    lo, hi = job.t_range
    return {"tdc": {"finetune": asdict(tdc_finetune), "num_groups": K}, "train_effective": asdict(job.cfg),
            "group": {"index": job.group, "lo": lo, "hi": hi}}


# ---- experts and the ensemble -----------------------------------------------------------------------------------


def expert_path(experts_dir, i: int) -> Path:
    """Where expert i's model file lives: <experts_dir>/<i>/model.pt."""
    return Path(experts_dir) / str(i) / "model.pt"


def check_expert(path, meta: dict, i: int, t_range: tuple[int, int], unified_sha: str) -> None:
    """ConfigError unless the expert file at `path` was fine-tuned on group i's [lo, hi) from the unified model whose
    file has sha256 `unified_sha`."""
    lo, hi = t_range
    if (meta.get("lo"), meta.get("hi")) != (lo, hi) or meta.get("unified_sha256") != unified_sha:
        raise ConfigError(f"{path} was fine-tuned on [{meta.get('lo')}, {meta.get('hi')}) from another unified model "
                          f"or range than group {i} = [{lo}, {hi}): rerun `dvc repro finetune@{i}`")


def load_router(groups_path, experts_dir, unified_path, K: int, use_ema: bool):
    """(ExpertRouter over the K experts with the unified fallback, Diffusion, shape, expert metas, unified meta).

    ConfigError if groups.json and the expert files disagree (stale experts or groups).
    """
    unified, diffusion, shape, unified_meta = load_model(unified_path, use_ema)
    groups = load_groups(groups_path, K, diffusion.T)
    unified_sha = sha256(unified_path)
    experts, metas = [], []
    for i, (lo, hi) in enumerate(groups):
        path = expert_path(experts_dir, i)
        model, _, eshape, meta = load_model(path, use_ema)
        check_expert(path, meta, i, (lo, hi), unified_sha)
        if tuple(eshape) != tuple(shape):
            raise ConfigError(f"{path} has image shape {list(eshape)}, {unified_path} {list(shape)}: "
                              f"rerun `dvc repro finetune@{i}`")
        experts.append(model)
        metas.append(meta)
    return ExpertRouter(experts, groups, fallback=unified), diffusion, shape, metas, unified_meta


def expert_coverage(router: ExpertRouter, T: int) -> float:
    """Fraction of t in [0, T) owned by an expert (1.0 when the groups tile [0, T))."""
    return float((router.expert_index(torch.arange(T)) >= 0).double().mean())


def compute_accounting(unified_meta: dict, expert_metas: list[dict], continued_meta: dict) -> dict:
    """Training compute of the unified model, the experts together and the continued baseline ('compute/...'
    metrics); 'compute/matched' is 1 when the experts saw exactly as many images as the baseline."""
    tdc_images = sum(m["images_seen"] for m in expert_metas)
    return {"compute/pretrain_images": unified_meta.get("images_seen", 0), "compute/tdc_finetune_images": tdc_images,
            "compute/tdc_finetune_flops": sum(m["train_flops"] for m in expert_metas),
            "compute/continued_images": continued_meta["images_seen"],
            "compute/continued_flops": continued_meta["train_flops"],
            "compute/matched": float(tdc_images == continued_meta["images_seen"])}


def trajectory_macs(router: ExpertRouter, expert_macs: list[float], fallback_macs: float,
                    ts: torch.Tensor) -> list[float]:
    """MACs of each sampling step: the MACs of the expert owning t_k, the fallback's where none does: (S,)."""
    return [expert_macs[k] if k >= 0 else fallback_macs for k in router.expert_index(ts).tolist()]
