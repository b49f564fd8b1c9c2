"""DVC stage `evaluate_tdc`: FID/KID/PR of the TDC expert ensemble and of the compute-matched unified baseline.

The ensemble is a `stepwise.router.ExpertRouter` (TDC, arXiv 2312.13307): expert i denoises t in group i's [lo, hi)
of groups.json, the unified model is the fallback. Both it and `models/continued` (the unified model trained on for
as many images as all experts together) are sampled exactly as `evaluate` samples the unified model (same `sample`
params, hence the same x_T and per-step noise) and scored against the test split; the unified model's scores are
read from metrics/evaluate.json, so all three are comparable.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from stepwise.checkpoint import load_denoiser, load_model_file
from stepwise.config import EvalConfig, SampleConfig, parse
from stepwise.data import load_split, sha256
from stepwise.errors import ConfigError, DataError
from stepwise.fidelity import INCEPTION_WEIGHTS, fidelity_metrics, find_inception_weights
from stepwise.grouping import groups_from_dict
from stepwise.io import save_torch
from stepwise.router import ExpertRouter
from stepwise.sampling import generate, to_uint8
from stepwise.tdc_config import num_groups
from stepwise.training import resolve_device
from stepwise.visualise import save_grid

from .common import ARTIFACTS, add_paths, load_params, report_metrics, run_stage, section, stage_run


log = logging.getLogger("stepwise.evaluate_tdc")
SAMPLES_FORMAT = "stepwise-samples/1"


def denoiser(path, use_ema: bool):
    """(model in eval mode, Diffusion, image_shape, meta) from a model file written by save_model."""
    model, diffusion, shape = load_denoiser(path, use_ema=use_ema)
    return model, diffusion, shape, load_model_file(path)["meta"]


def load_router(groups_path, experts_dir, unified_path, K: int, use_ema: bool):
    """(ExpertRouter over the K experts with the unified fallback, Diffusion, shape, expert metas, unified meta).

    ConfigError if groups.json and the expert files disagree (stale experts or groups).
    """
    if not Path(groups_path).is_file():
        raise ConfigError(f"{groups_path}: not found; run `dvc repro cluster`")
    groups = groups_from_dict(json.loads(Path(groups_path).read_text()))
    if len(groups) != K:
        raise ConfigError(f"{groups_path} holds {len(groups)} groups but tdc.num_groups={K}: rerun `dvc repro cluster`")
    unified, diffusion, shape, unified_meta = denoiser(unified_path, use_ema)
    unified_sha = sha256(unified_path)
    experts, metas = [], []
    for i, (lo, hi) in enumerate(groups):
        path = Path(experts_dir) / str(i) / "model.pt"
        model, _, eshape, meta = denoiser(path, use_ema)
        if (meta.get("lo"), meta.get("hi")) != (lo, hi) or tuple(eshape) != tuple(shape):
            raise ConfigError(f"{path} was fine-tuned on [{meta.get('lo')}, {meta.get('hi')}) but {groups_path} says "
                              f"group {i} is [{lo}, {hi}): rerun `dvc repro finetune@{i}`")
        if meta.get("unified_sha256") != unified_sha:
            raise ConfigError(f"{path} was fine-tuned from another unified model than {unified_path}: "
                              f"rerun `dvc repro finetune@{i}`")
        experts.append(model)
        metas.append(meta)
    return ExpertRouter(experts, groups, fallback=unified), diffusion, shape, metas, unified_meta


def expert_coverage(router: ExpertRouter, T: int) -> float:
    """Fraction of t in [0, T) owned by an expert (1.0 when the groups tile [0, T))."""
    return float((router.expert_index(torch.arange(T)) >= 0).double().mean())


def load_samples(path, scfg: SampleConfig) -> torch.Tensor:
    """uint8 samples (N, C, H, W) saved by an evaluate stage; ConfigError if drawn with other sample settings."""
    from stepwise.io import load_torch

    obj = load_torch(path, SAMPLES_FORMAT, error=DataError, hint="Rerun the evaluate stage that writes it.")
    drawn = (obj["sampler"], obj["steps"], obj["seed"])
    if drawn != (scfg.sampler, scfg.steps, scfg.seed):
        raise ConfigError(f"{path} was sampled with (sampler, steps, seed)={drawn}, params say "
                          f"{(scfg.sampler, scfg.steps, scfg.seed)}: rerun the stage that writes it")
    return obj["images"]


def sample_and_save(model, diffusion, shape, scfg: SampleConfig, num: int, device, out: Path) -> tuple[torch.Tensor,
                                                                                                        float]:
    """Sample like `evaluate` (same noise), save samples.pt and grid.png under `out`: (uint8 images, seconds)."""
    t0 = time.time()
    samples = generate(model.to(device), diffusion.to(device), num, shape, sampler=scfg.sampler, steps=scfg.steps,
                       eta=scfg.eta, seed=scfg.seed, batch_size=scfg.batch_size, device=device,
                       amp_dtype=torch.bfloat16 if device.type == "cuda" else None)
    seconds = time.time() - t0
    images = to_uint8(samples)  # (N, C, H, W) uint8
    save_torch({"format": SAMPLES_FORMAT, "images": images, "sampler": scfg.sampler, "steps": scfg.steps,
                "seed": scfg.seed}, out / "samples.pt")
    save_grid(images[: scfg.grid_size**2], out / "grid.png", nrow=scfg.grid_size)
    return images, seconds


def main(args) -> None:
    params = load_params(args.params)
    scfg = parse(SampleConfig, section(params, "sample"), "sample")
    ecfg = parse(EvalConfig, section(params, "eval"), "eval")
    inception = find_inception_weights(ecfg.inception)
    router, diffusion, shape, expert_metas, unified_meta = load_router(
        args.groups, args.experts, args.unified, num_groups(section(params, "tdc")), scfg.use_ema)
    continued, _, cshape, continued_meta = denoiser(args.continued, scfg.use_ema)
    if tuple(cshape) != tuple(shape):
        raise ConfigError(f"{args.continued} has image shape {cshape}, the unified model {shape}: "
                          f"rerun `dvc repro continue_unified`")
    if not Path(args.unified_metrics).is_file():
        raise DataError(f"{args.unified_metrics}: not found; run `dvc repro evaluate`")
    unified_metrics = json.loads(Path(args.unified_metrics).read_text())
    test_images, _, _ = load_split(f"{args.data}/test.pt")
    device = resolve_device("auto")
    with stage_run("evaluate_tdc", params, {"sample": asdict(scfg), "eval": asdict(ecfg)}) as run:
        kw = dict(fid=ecfg.fid, kid=ecfg.kid, prc=ecfg.prc, kid_subset_size=ecfg.kid_subset_size,
                  cuda=device.type == "cuda")
        if not inception:
            log.info("Inception-v3 weights (%s) not found: skipping *_inception metrics.", INCEPTION_WEIGHTS)
        metrics = {"expert_coverage": expert_coverage(router, diffusion.T), "num_samples": ecfg.num_samples}
        scores = {}
        for name, model, out in (("tdc", router, args.out_tdc), ("continued", continued, args.out_continued)):
            images, seconds = sample_and_save(model, diffusion, shape, scfg, ecfg.num_samples, device, Path(out))
            scores[name] = fidelity_metrics(images, test_images, extractor="featnet", weights_path=args.featnet, **kw)
            if inception:
                scores[name].update(fidelity_metrics(images, test_images, extractor="inception",
                                                     weights_path=inception, **kw))
            metrics[f"{name}/sampling_seconds"] = seconds
            run.log_artifact(Path(out) / "grid.png", name)
        scores["unified"] = {k: v for k, v in unified_metrics.items() if k in scores["tdc"]}
        for name, values in scores.items():
            metrics.update({f"{name}/{k}": v for k, v in values.items()})
        for k, v in scores["tdc"].items():
            if k in scores["unified"]:
                metrics[f"delta_tdc_vs_unified/{k}"] = v - scores["unified"][k]
            metrics[f"delta_tdc_vs_continued/{k}"] = v - scores["continued"][k]
        tdc_images = sum(m["images_seen"] for m in expert_metas)
        metrics.update({"compute/pretrain_images": unified_meta.get("images_seen", 0),
                        "compute/tdc_finetune_images": tdc_images,
                        "compute/tdc_finetune_flops": sum(m["train_flops"] for m in expert_metas),
                        "compute/continued_images": continued_meta["images_seen"],
                        "compute/continued_flops": continued_meta["train_flops"],
                        "compute/matched": float(tdc_images == continued_meta["images_seen"])})
        if tdc_images != continued_meta["images_seen"]:
            log.warning("compute not matched: experts saw %d images, the continued unified model %d",
                        tdc_images, continued_meta["images_seen"])
        report_metrics(run, metrics, args.metrics, log)


def configure(parser) -> None:
    add_paths(parser, "data", "groups", "experts", "unified", "continued", "featnet", "unified_metrics",
              out_tdc="samples/tdc", out_continued="samples/continued", metrics=ARTIFACTS["tdc_metrics"])


if __name__ == "__main__":
    run_stage("evaluate_tdc", main, configure)
