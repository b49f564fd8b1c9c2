"""DVC stage `consistency`: the consistency phenomenon (Xu et al., arXiv 2404.07946) across the trained models.

Pairs (tdc.consistency.pairs) compare the first num_samples samples of two models drawn from identical x_T and
per-step noise: the unified, TDC and continued sets of the evaluate stages (all drawn with the `sample` params), and
any extra models (tdc.consistency.extra_models: e.g. the unified model trained from another seed, or a DiT), which
are trained here from scratch with the `train` section and sampled the same way. Reported per pair: pixel MSE, SSIM
and FeatNet feature distance (stepwise.consistency). Split pairs (a, b) follow a for t >= s and b below, for each
split step s = round(f T): consistency with a's own samples against s (s = 0 is a itself: MSE 0, SSIM 1).
This is the pipeline's last stage; it marks the MLflow parent run complete.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from stepwise.artifacts import load_denoiser, load_model_file, load_samples, train_sha, write_table
from dataclasses import replace

from stepwise.config import parse_model
from stepwise.consistency import (check_sample_sets, consistency_report, featnet_feature_fn, split_consistency,
                                  write_extras_index)
from stepwise.data import load_split, to_model_range
from stepwise.evaluation import amp_dtype, sample
from stepwise.featnet import load_featnet
from stepwise.progress import progress
from stepwise.tdc import load_router
from stepwise.distributed import resolve_device
from stepwise.training import train_from_scratch
from stepwise.visualise import pair_grid, plot_split

from stepwise.tracking import stage_run

from .common import add_paths, report_metrics, run_stage

log = logging.getLogger("stepwise.consistency")


def main(args, cfg) -> None:
    scfg, ccfg, K = cfg.sample, cfg.tdc.consistency, cfg.tdc.num_groups
    sets = {name: load_samples(Path(path) / "samples.pt", scfg) for name, path in
            (("unified", args.unified_samples), ("tdc", args.tdc_samples), ("continued", args.continued_samples))}
    check_sample_sets(sets, ccfg.num_samples, ccfg.window_size)
    extras = {name: (asdict(parse_model(spec["model"]) if "model" in spec else cfg.model),
                     replace(cfg.train, seed=spec.get("seed", cfg.train.seed)))
              for name, spec in ccfg.extra_models.items()}
    device = resolve_device("auto")
    router, diffusion, shape, _, _ = load_router(args.groups, args.experts, args.unified, K, scfg.use_ema)
    continued = load_denoiser(args.continued, scfg.use_ema)[0]
    diffusion = diffusion.to(device)
    feature_fn = featnet_feature_fn(load_featnet(args.featnet)[0]) if ccfg.feature_distance else None
    out, n = Path(args.out), ccfg.num_samples
    with stage_run("consistency", cfg.raw, {"tdc": {"consistency": asdict(ccfg)}, "sample": asdict(scfg)}) as run:
        models = {"unified": router.fallback, "tdc": router, "continued": continued}
        for name, (model_cfg, tcfg) in extras.items():  # from scratch, resumable under <extras>/<name>
            images, _, _ = load_split(f"{args.data}/train.pt")
            result = train_from_scratch(
                model_cfg, load_model_file(args.unified)["diffusion"], tcfg, images, train_sha(args.data),
                Path(args.extras) / name, meta={"seed": tcfg.seed},
                log_fn=lambda m, step, name=name: run.log_metrics({f"{name}/{k}": v for k, v in m.items()}, step))
            models[name] = result["ema"].eval()
            sets[name] = sample(models[name], result["diffusion"].eval(), shape, scfg, n, device, progress=False)
        write_extras_index(args.extras, ccfg.extra_models)
        metrics = {"num_samples": n}
        for a, b in progress(ccfg.pairs, desc="sample pairs"):
            xa, xb = sets[a][:n], sets[b][:n]
            report = consistency_report(to_model_range(xa), to_model_range(xb), feature_fn,
                                        window_size=ccfg.window_size)
            metrics.update({f"pair/{a}_vs_{b}/{k}": v for k, v in report.items() if k != "num"})
            pair_grid(xa, xb, min(ccfg.grid_pairs, n), out / f"pair_{a}_vs_{b}.png")
        rows = []
        for a, b in progress(ccfg.split_pairs, desc="split pairs"):
            for r in split_consistency(models[a].to(device), models[b].to(device), diffusion,
                                       ccfg.split_timesteps(diffusion.T), n, shape, feature_fn,
                                       window_size=ccfg.window_size, sampler=scfg.sampler, steps=scfg.steps,
                                       eta=scfg.eta, seed=scfg.seed, batch_size=scfg.batch_size, device=device,
                                       amp_dtype=amp_dtype(device)):
                report = {k: v for k, v in r.items() if k not in ("num", "split_t")}
                rows.append({"pair": f"{a}_to_{b}", "split_t": r["split_t"], **report})
                metrics.update({f"split/{a}_to_{b}/t{r['split_t']}/{k}": v for k, v in report.items()})
        if rows:
            keys = [k for k in rows[0] if k not in ("pair", "split_t")]
            write_table(out / "split.csv", ["pair", "split_t", *keys],
                        [[r["pair"], r["split_t"], *(float(r[k]) for k in keys)] for r in rows])
            plot_split(rows, out / "split.png")
        report_metrics(run, metrics, args.metrics, log)
        run.log_artifact(out)


def configure(parser) -> None:
    add_paths(parser, "data", "groups", "experts", "unified", "continued", "featnet", unified_samples="samples/unified",
              tdc_samples="samples/tdc", continued_samples="samples/continued", extras="models/consistency",
              out="outputs/consistency", metrics="metrics/consistency.json")


if __name__ == "__main__":
    run_stage("consistency", main, configure)
