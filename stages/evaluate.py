"""DVC stage `evaluate`: sample with fixed seeded noise, save a grid, and score FID/KID/PR against the test split."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from stepwise.checkpoint import load_denoiser
from stepwise.config import EvalConfig, SampleConfig, parse
from stepwise.data import load_split
from stepwise.fidelity import INCEPTION_WEIGHTS, fidelity_metrics, find_inception_weights
from stepwise.io import save_torch
from stepwise.sampling import generate, to_uint8
from stepwise.training import resolve_device
from stepwise.visualise import save_grid

from .common import load_params, run_stage, section, stage_run, write_metrics

log = logging.getLogger("stepwise.evaluate")


def main(args) -> None:
    params = load_params(args.params)
    scfg = parse(SampleConfig, section(params, "sample"), "sample")
    ecfg = parse(EvalConfig, section(params, "eval"), "eval")
    inception = find_inception_weights(ecfg.inception)
    model, diffusion, shape = load_denoiser(args.model, use_ema=scfg.use_ema)
    test_images, _, _ = load_split(f"{args.data}/test.pt")
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
        write_metrics(metrics, args.metrics)
        run.log_metrics(metrics)
        run.log_artifact(out / "grid.png")
        log.info("metrics: %s", {k: round(v, 4) for k, v in metrics.items()})


def configure(parser) -> None:
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--model", default="models/unified/model.pt")
    parser.add_argument("--featnet", default="models/featnet.pt")
    parser.add_argument("--out", default="samples/unified")
    parser.add_argument("--metrics", default="metrics/evaluate.json")


if __name__ == "__main__":
    run_stage("evaluate", main, configure)
