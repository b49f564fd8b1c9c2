"""The pruned TDC ensemble (`evaluate_pruned`): pruned experts routed like the unpruned ones, MACs per sampling step,
and the headline metrics against the unified model and the unpruned ensemble (TDC, arXiv 2312.13307)."""
from __future__ import annotations

import torch

from ..data import sha256
from ..errors import CheckpointError, ConfigError
from ..evaluation import score_deltas
from ..flops import count_macs, example_inputs
from ..router import ExpertRouter
from ..tdc import expert_path, trajectory_macs
from .model_file import load_pruned

ENSEMBLES = ("unified", "tdc", "pruned")
GOAL_MACS_SAVING = 0.40  # the project's target: >= 40 % fewer MACs per sample than the unified model
GOAL_METRIC = "fid_featnet"  # ... at an FID (FeatNet features, always available offline) no worse than it


def load_pruned_router(pruned_dir, experts_dir, router: ExpertRouter, use_ema: bool) -> tuple[ExpertRouter, list]:
    """The pruned experts <pruned_dir>/<i>/model.pt routed like `router` (same ranges and fallback), and their metas;
    ConfigError if one was pruned from another expert file or range."""
    models, metas = [], []
    for i, (lo, hi) in enumerate(router.ranges):
        path = expert_path(pruned_dir, i)
        model, _, _, meta = load_pruned(path, use_ema=use_ema)
        expert = expert_path(experts_dir, i)
        if (meta.get("lo"), meta.get("hi")) != (lo, hi) or meta.get("expert_sha256") != sha256(expert):
            raise ConfigError(f"{path} was pruned from another expert or range than {expert} on [{lo}, {hi}): "
                              f"rerun `dvc repro prune@{i}`")
        models.append(model)
        metas.append(meta)
    return ExpertRouter(models, router.ranges, fallback=router.fallback), metas


def sampling_macs(router: ExpertRouter, pruned: ExpertRouter, pruned_metas: list[dict], shape,
                  ts: torch.Tensor) -> tuple[dict[str, list[int]], list[int], int]:
    """({'unified' | 'tdc' | 'pruned': MACs of each sampling step at timesteps ts (S,)}, pruned experts' MACs, full
    model's MACs); CheckpointError if a pruned expert's measured MACs differ from those its file records."""
    inputs = example_inputs(shape[0], shape[1])
    full = count_macs(router.fallback, inputs)
    expert_macs = [count_macs(m, inputs) for m in router.experts]
    pruned_macs = [count_macs(m, inputs) for m in pruned.experts]
    for i, (m, meta) in enumerate(zip(pruned_macs, pruned_metas)):
        if m != meta["macs_per_forward"]:
            raise CheckpointError(f"pruned expert {i}: {m:.6g} MACs measured, {meta['macs_per_forward']:.6g} recorded; "
                                  f"rerun `dvc repro prune@{i}`")
    per_step = {"unified": [full] * len(ts), "tdc": trajectory_macs(router, expert_macs, full, ts),
                "pruned": trajectory_macs(pruned, pruned_macs, full, ts)}
    return per_step, pruned_macs, full


def pruned_ensemble_metrics(scores: dict[str, dict], per_step: dict[str, list], speed: dict[str, float],
                            pruned_macs: list[int], pruned_metas: list[dict], full: int, owners: list[int]) -> dict:
    """Scores, MACs per sample and images/s of each ENSEMBLES model; the pruned ensemble's deltas, MACs saving and
    speed-up against the other two; per pruned expert its MACs and budget fractions, parameters and sampling steps
    owned (`owners`: the expert index of each step); and the goal: 'goal/met' = MACs saving vs unified >=
    GOAL_MACS_SAVING at a GOAL_METRIC no worse than the unified model's."""
    per_sample = {name: sum(v) for name, v in per_step.items()}
    metrics = {}
    for name in ENSEMBLES:
        metrics.update({f"{name}/{k}": v for k, v in scores[name].items()})
        metrics[f"{name}/macs_per_sample"] = per_sample[name]
        metrics[f"{name}/images_per_second"] = speed[name]
    metrics.update(score_deltas(scores, "pruned", ("unified", "tdc")))
    for other in ("unified", "tdc"):
        metrics[f"macs_saving_vs_{other}"] = 1 - per_sample["pruned"] / per_sample[other]
        metrics[f"speedup_vs_{other}"] = speed["pruned"] / speed[other]
    for i, (m, meta) in enumerate(zip(pruned_macs, pruned_metas)):
        metrics.update({f"expert_{i}/macs_fraction": m / full, f"expert_{i}/budget_fraction": meta["budget_macs"] / full,
                        f"expert_{i}/params": meta["num_params"], f"expert_{i}/steps_owned": owners.count(i)})
    fid_delta = scores["pruned"][GOAL_METRIC] - scores["unified"][GOAL_METRIC]
    saving = metrics["macs_saving_vs_unified"]
    metrics.update({"goal/macs_saving_vs_unified": saving, "goal/fid_delta": fid_delta,
                    "goal/macs_saving_target": GOAL_MACS_SAVING,
                    "goal/met": float(saving >= GOAL_MACS_SAVING and fid_delta <= 0)})
    return metrics
