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

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stepwise.checkpoint import load_model_file, save_model
from stepwise.config import SampleConfig, TrainConfig, parse
from stepwise.consistency import consistency_report, featnet_feature_fn, switch_model
from stepwise.data import load_split, to_model_range
from stepwise.errors import ConfigError
from stepwise.featnet import load_featnet
from stepwise.io import write_json, write_text
from stepwise.models import build_model
from stepwise.seeding import derive_seed
from stepwise.sampling import generate, to_uint8
from stepwise.tdc_config import ConsistencyConfig, num_groups
from stepwise.training import resolve_device, train
from stepwise.visualise import save_figure, save_grid

from .common import add_paths, load_params, report_metrics, run_stage, section, stage_run
from .evaluate_tdc import denoiser, load_router, load_samples
from .pretrain import INIT_SEED, run_fingerprint

log = logging.getLogger("stepwise.consistency")


def train_extra(name: str, spec: dict, params: dict, diffusion_cfg: dict, data_dir, root: Path, log_fn):
    """Train extra model `name` from scratch (its own seed and/or architecture), resumable under root/name."""
    from stepwise.diffusion import Diffusion

    model_cfg = spec.get("model") or section(params, "model")
    train_section = section(params, "train")
    tcfg = parse(TrainConfig, {**train_section, "seed": spec.get("seed", train_section.get("seed", 0))},
                 f"tdc.consistency.extra_models.{name}")
    images, _, _ = load_split(f"{data_dir}/train.pt")
    data_sha = json.loads(Path(data_dir, "card.json").read_text())["splits"]["train"]["sha256"]
    diffusion = Diffusion.from_config(diffusion_cfg)
    c = images.shape[1]
    model = build_model(model_cfg, image_size=images.shape[-1], channels=c,
                        out_channels=c * diffusion.out_channels_factor, seed=derive_seed(tcfg.seed, INIT_SEED))
    run_id = run_fingerprint(model_cfg, diffusion_cfg, tcfg, data_sha)
    result = train(model, diffusion, images, tcfg, root / name / "checkpoints",
                   fingerprint=run_id, log_fn=lambda m, step: log_fn({f"{name}/{k}": v for k, v in m.items()}, step))
    save_model(root / name / "model.pt", model_cfg=model_cfg, diffusion_cfg=diffusion_cfg,
               image_shape=images.shape[1:], state_dict=result["model"].state_dict(),
               ema_state_dict=result["ema"].state_dict(), diffusion_state=diffusion.state_dict(),
               meta={"steps": tcfg.steps, "images_seen": result["images_seen"], "fingerprint": run_id,
                     "seed": tcfg.seed})
    return result["ema"].eval(), diffusion.eval()


def pair_grid(a: torch.Tensor, b: torch.Tensor, n: int, path) -> None:
    """Grid of n sample pairs: row 2k holds model a's samples, row 2k+1 model b's (uint8 (N, C, H, W))."""
    per_row = min(8, n)
    rows = []
    for s in range(0, n, per_row):
        rows += [a[s : s + per_row], b[s : s + per_row]]
    rows = [r for r in rows if len(r) == per_row]
    save_grid(torch.cat(rows), path, nrow=per_row)


def plot_split(rows: list[dict], path) -> None:
    """MSE and SSIM against the split step, one line per split pair (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for pair in sorted({r["pair"] for r in rows}):
        pr = [r for r in rows if r["pair"] == pair]
        for ax, key in zip(axes, ("mse", "ssim")):
            ax.plot([r["split_t"] for r in pr], [r[key] for r in pr], marker="o", label=pair)
            ax.set_xlabel("split step s (model a for t >= s, b below)")
            ax.set_ylabel(f"{key} vs model a alone")
    axes[0].legend()
    save_figure(fig, path)


def main(args) -> None:
    params = load_params(args.params)
    scfg = parse(SampleConfig, section(params, "sample"), "sample")
    ccfg = parse(ConsistencyConfig, section(params, "tdc", "consistency"), "tdc.consistency")
    K = num_groups(section(params, "tdc"))
    sets = {name: load_samples(Path(path) / "samples.pt", scfg) for name, path in
            (("unified", args.unified_samples), ("tdc", args.tdc_samples), ("continued", args.continued_samples))}
    smallest = min(len(s) for s in sets.values())
    if ccfg.num_samples > smallest:
        raise ConfigError(f"tdc.consistency.num_samples={ccfg.num_samples} exceeds the {smallest} evaluation samples "
                          f"(eval.num_samples); lower it")
    height, width = sets["unified"].shape[2:]
    if min(height, width) < ccfg.window_size:
        raise ConfigError(f"tdc.consistency.window_size={ccfg.window_size} exceeds the image size {height}x{width}")
    device = resolve_device("auto")
    router, diffusion, shape, _, _ = load_router(args.groups, args.experts, args.unified, K, scfg.use_ema)
    continued = denoiser(args.continued, scfg.use_ema)[0]
    diffusion = diffusion.to(device)
    feature_fn = featnet_feature_fn(load_featnet(args.featnet)[0]) if ccfg.feature_distance else None
    gen = dict(sampler=scfg.sampler, steps=scfg.steps, eta=scfg.eta, seed=scfg.seed, batch_size=scfg.batch_size,
               device=device, amp_dtype=torch.bfloat16 if device.type == "cuda" else None, progress=False)
    out, n = Path(args.out), ccfg.num_samples
    extras_root = Path(args.extras)
    extras_root.mkdir(parents=True, exist_ok=True)
    with stage_run("consistency", params, {"tdc": {"consistency": asdict(ccfg)}, "sample": asdict(scfg)}) as run:
        models = {"unified": router.fallback, "tdc": router, "continued": continued}
        for name, spec in ccfg.extra_models.items():
            models[name], extra_diffusion = train_extra(name, spec, params, load_model_file(args.unified)["diffusion"],
                                                        args.data, extras_root, run.log_metrics)
            sets[name] = to_uint8(generate(models[name].to(device), extra_diffusion.to(device), n, shape, **gen))
        write_json({"format": "stepwise-consistency-extras/1", "models": {
            name: {"path": f"{name}/model.pt", **spec} for name, spec in ccfg.extra_models.items()}},
            extras_root / "extras.json")
        metrics = {"num_samples": n}
        for a, b in tqdm(ccfg.pairs, desc="sample pairs"):
            xa, xb = sets[a][:n], sets[b][:n]
            report = consistency_report(to_model_range(xa), to_model_range(xb), feature_fn,
                                        window_size=ccfg.window_size)
            metrics.update({f"pair/{a}_vs_{b}/{k}": v for k, v in report.items() if k != "num"})
            pair_grid(xa, xb, min(ccfg.grid_pairs, n), out / f"pair_{a}_vs_{b}.png")
        rows = []
        for a, b in ccfg.split_pairs:
            ma, mb = models[a].to(device), models[b].to(device)
            reference = generate(ma, diffusion, n, shape, **gen)  # (n, C, H, W) in [-1, 1]
            for s in tqdm(ccfg.split_timesteps(diffusion.T), desc=f"split {a}->{b}"):
                samples = generate(switch_model(ma, mb, s), diffusion, n, shape, **gen)
                report = consistency_report(reference, samples, feature_fn, window_size=ccfg.window_size)
                rows.append({"pair": f"{a}_to_{b}", "split_t": s, **{k: v for k, v in report.items() if k != "num"}})
                metrics.update({f"split/{a}_to_{b}/t{s}/{k}": v for k, v in report.items() if k != "num"})
        if rows:
            keys = [k for k in rows[0] if k not in ("pair", "split_t")]
            write_text("pair,split_t," + ",".join(keys) + "\n" + "".join(
                f"{r['pair']},{r['split_t']}," + ",".join(repr(float(r[k])) for k in keys) + "\n" for r in rows),
                out / "split.csv")
            plot_split(rows, out / "split.png")
        report_metrics(run, metrics, args.metrics, log)
        run.log_artifact(out)


def configure(parser) -> None:
    add_paths(parser, "data", "groups", "experts", "unified", "continued", "featnet", unified_samples="samples/unified",
              tdc_samples="samples/tdc", continued_samples="samples/continued", extras="models/consistency",
              out="outputs/consistency", metrics="metrics/consistency.json")


if __name__ == "__main__":
    run_stage("consistency", main, configure)
