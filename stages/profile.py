"""DVC stage `profile`: per-timestep difficulty of the unified model (arXiv 2403.10348; TDC, arXiv 2312.13307).

On a grid of K timesteps (bin centres of K equal t-bins) it measures the EMA model's loss mean/variance on fixed
probe examples, SNR_dB, the closed-form (Gaussian-fit) and optionally Monte-Carlo relative entropy
KL(p_{t-1} || p_t), the convergence speed of the t-bin of each grid point from the pretrain loss history, and the
cosine similarity of per-timestep loss gradients (`stepwise.difficulty.difficulty_profile`). Writes
<out>/profile.csv (one row per grid t), <out>/similarity.csv (K x K) and <out>/profile.png.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

from stepwise.artifacts import load_model, load_split_for, read_table, write_table
from stepwise.difficulty import check_profile, difficulty_profile
from stepwise.models import count_params
from stepwise.distributed import resolve_device
from stepwise.visualise import plot_profile

from stepwise.tracking import stage_run

from .common import ARTIFACTS, add_paths, run_stage

log = logging.getLogger("stepwise.profile")


def main(args, cfg) -> None:
    pcfg = cfg.tdc.profile
    model, diffusion, shape, meta = load_model(args.model, use_ema=pcfg.use_ema)
    images = load_split_for(args.model, meta, shape, args.data, "train")
    check_profile(pcfg, len(images), count_params(model))
    history = read_table(args.history, "dvc repro pretrain", ("step",))
    device = resolve_device(pcfg.device)
    model, diffusion = model.to(device), diffusion.to(device)
    out = Path(args.out)
    with stage_run("profile", cfg.raw, {"tdc": {"profile": asdict(pcfg)}}) as run:
        columns, sim = difficulty_profile(model, diffusion, images, history, pcfg)
        ts = columns["t"]
        write_table(out / "profile.csv", list(columns), zip(*columns.values()))
        write_table(out / "similarity.csv", ["t", *ts.tolist()], ([t, *row] for t, row in zip(ts.tolist(),
                                                                                          sim.tolist())))
        plot_profile(columns, sim, out / "profile.png")
        for k, t in enumerate(ts.tolist()):
            run.log_metrics({f"profile/{name}": float(col[k]) for name, col in columns.items()
                             if name != "t" and math.isfinite(float(col[k]))}, step=int(t))
        run.log_metrics({"num_timesteps": len(ts), "hardest_t_by_loss": int(ts[int(columns["loss_mean"].argmax())]),
                         "slowest_t_by_convergence": int(ts[int(columns["convergence_speed"].argmax())])})
        run.log_artifact(out)
        log.info("profiled %d timesteps -> %s", len(ts), out)


def configure(parser) -> None:
    add_paths(parser, "data", "history", model=ARTIFACTS["unified"], out=ARTIFACTS["profile"])


if __name__ == "__main__":
    run_stage("profile", main, configure)
