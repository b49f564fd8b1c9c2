"""DVC stage `evaluate`: sample with fixed seeded noise, save a grid, and score FID/KID/PR against the test split."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from stepwise.checkpoint import checkpoint_paths, load_checkpoint_ema, load_denoiser
from stepwise.errors import StepwiseError
from stepwise.data import load_split
from stepwise.featnet import load_featnet
from stepwise.fidelity import INCEPTION_WEIGHTS, fidelity_metrics, find_inception_weights
from stepwise.io import save_torch, write_text
from stepwise.params import validate_params
from stepwise.sampling import generate, to_uint8
from stepwise.training import resolve_device
from stepwise.visualise import save_grid

from .common import ARTIFACTS, add_paths, load_params, report_metrics, run_stage, stage_run

log = logging.getLogger("stepwise.evaluate")


def main(args) -> None:
    params = load_params(args.params)
    cfg = validate_params(params, ("sample", "eval"))
    scfg, ecfg = cfg["sample"], cfg["eval"]
    inception = find_inception_weights(ecfg.inception)
    model, diffusion, shape = load_denoiser(args.model, use_ema=scfg.use_ema)
    test_images, _, _ = load_split(f"{args.data}/test.pt")
    load_featnet(args.featnet)  # a missing or corrupt feature network fails here, before sampling
    device = resolve_device("auto")
    with stage_run("evaluate", params, {"sample": asdict(scfg), "eval": asdict(ecfg)}) as run:
        t0 = time.time()
        samples = generate(model.to(device), diffusion, ecfg.num_samples, shape, sampler=scfg.sampler,
                           steps=scfg.steps, eta=scfg.eta, seed=scfg.seed, batch_size=scfg.batch_size, device=device,
                           amp_dtype=torch.bfloat16 if device.type == "cuda" else None)
        seconds = time.time() - t0
        images = to_uint8(samples)  # (N, C, H, W) uint8
        out = Path(args.out)
        save_torch({"format": "stepwise-samples/1", "images": images, "sampler": scfg.sampler, "steps": scfg.steps,
                    "seed": scfg.seed}, out / "samples.pt")
        save_grid(images[: scfg.grid_size**2], out / "grid.png", nrow=scfg.grid_size)
        kw = dict(fid=ecfg.fid, kid=ecfg.kid, prc=ecfg.prc, kid_subset_size=ecfg.kid_subset_size,
                  cuda=device.type == "cuda")
        metrics = fidelity_metrics(images, test_images, extractor="featnet", weights_path=args.featnet, **kw)
        if inception:
            metrics.update(fidelity_metrics(images, test_images, extractor="inception", weights_path=inception, **kw))
        else:
            log.info("Inception-v3 weights (%s) not found: skipping *_inception metrics. Set eval.inception to the "
                     "file's path, or place it in the torch hub cache, to compute them.", INCEPTION_WEIGHTS)
        metrics.update({"num_samples": ecfg.num_samples, "sampling_seconds": seconds,
                        "samples_per_second": ecfg.num_samples / seconds})
        curve = fid_curve(model, diffusion, shape, test_images, args.checkpoints, scfg, ecfg, args.featnet,
                          device) if ecfg.curve_samples else []
        write_text("step,fid_featnet,kid_featnet\n" + "".join(
            f"{r['step']},{r['fid_featnet']},{r.get('kid_featnet', '')}\n" for r in curve), args.curve)
        for r in curve:
            run.log_metrics({"curve_fid_featnet": r["fid_featnet"]}, step=r["step"])
        report_metrics(run, metrics, args.metrics, log)
        run.log_artifact(out / "grid.png")


def fid_curve(model, diffusion, shape, test_images, ckpt_dir, scfg, ecfg, featnet, device) -> list[dict]:
    """FID (curve_samples samples, same fixed noise) of the EMA weights of every kept training checkpoint."""
    rows = []
    for path in checkpoint_paths(ckpt_dir):
        step = load_checkpoint_ema(path, model, diffusion)
        images = to_uint8(generate(model.to(device), diffusion.to(device), ecfg.curve_samples, shape,
                                   sampler=scfg.sampler, steps=scfg.steps, eta=scfg.eta, seed=scfg.seed,
                                   batch_size=scfg.batch_size, device=device, progress=False))
        m = fidelity_metrics(images, test_images, extractor="featnet", weights_path=featnet, fid=True,
                             kid=ecfg.kid, prc=False, kid_subset_size=ecfg.kid_subset_size, cuda=device.type == "cuda")
        rows.append({"step": step, **m})
        log.info("curve: step %d fid_featnet %.4f", step, m["fid_featnet"])
    if not rows:
        raise StepwiseError(f"eval.curve_samples is set but {ckpt_dir} holds no checkpoints; rerun pretrain")
    return rows


def configure(parser) -> None:
    add_paths(parser, "data", "featnet", "checkpoints", model=ARTIFACTS["unified"], out="samples/unified",
              metrics=ARTIFACTS["unified_metrics"], curve="plots/fid_curve.csv")


if __name__ == "__main__":
    run_stage("evaluate", main, configure)
