"""DVC stage `pretrain`: train the unified denoiser on all timesteps (TDC stage 1, arXiv 2312.13307).

Resumable: checkpoints live in <out>/checkpoints (a persistent DVC output); rerunning after a crash or kill
continues from the newest checkpoint of the same configuration.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from stepwise.checkpoint import fingerprint, save_model
from stepwise.data import load_split
from stepwise.distributed import dist_info, init_from_env
from stepwise.diffusion import Diffusion
from stepwise.io import write_text
from stepwise.models import build_model, count_params
from stepwise.params import validate_params
from stepwise.seeding import derive_seed
from stepwise.training import train

from .common import (ARTIFACTS, add_paths, load_params, rank_zero_run, relaunch_under_torchrun, report_metrics,
                     run_stage)

log = logging.getLogger("stepwise.pretrain")

INIT_SEED = 11  # stream of derive_seed(train.seed, ...) that initialises the weights
# Settings that may change between a run and its resumption without making it a different run.
RESUME_NEUTRAL = ("steps", "ckpt_every", "keep_checkpoints", "log_every", "device")  # nproc is not: per-rank RNG


def run_fingerprint(model_cfg: dict, diffusion_cfg: dict, tcfg, data_sha: str, neutral=RESUME_NEUTRAL) -> str:
    """Identity of a from-scratch training run: checkpoints resume only into the run with the same fingerprint.

    Includes the seeded weight initialisation (INIT_SEED stream of train.seed), so checkpoints written before weights
    were seeded, or from another init stream, are not resumed."""
    init = {"init": "seeded", "init_seed": derive_seed(tcfg.seed, INIT_SEED)}
    return fingerprint(init, model_cfg, diffusion_cfg, {k: v for k, v in asdict(tcfg).items() if k not in neutral},
                       data_sha)


def history_csv(history: list[dict]) -> str:
    """Logged rows as CSV (step, loss, lr, loss_bin/k, loss_var_bin/k ...) for `dvc plots`."""
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "step", k))
    lines = [",".join(keys)] + [",".join(str(row.get(k, "")) for k in keys) for row in history]
    return "\n".join(lines) + "\n"


def main(args) -> None:
    params = load_params(args.params)
    cfg = validate_params(params, ("model", "diffusion", "train"))
    model_cfg, dcfg, tcfg = params["model"], cfg["diffusion"], cfg["train"]
    relaunch_under_torchrun(tcfg.nproc, "stages.pretrain")
    init_from_env()
    rank, _ = dist_info()
    images, _, _ = load_split(f"{args.data}/train.pt")
    data_sha = json.loads(Path(args.data, "card.json").read_text())["splits"]["train"]["sha256"]
    diffusion = Diffusion.from_config(asdict(dcfg))
    c = images.shape[1]
    model = build_model(model_cfg, image_size=images.shape[-1], channels=c, out_channels=c * diffusion.out_channels_factor,
                        seed=derive_seed(tcfg.seed, INIT_SEED))
    neutral = set(RESUME_NEUTRAL)
    if tcfg.momentum_decay != "none" and "total_steps" not in tcfg.momentum_decay_args:
        neutral.discard("steps")  # the momentum schedule spans train.steps: more steps is another run
    run_id = run_fingerprint(model_cfg, asdict(dcfg), tcfg, data_sha, neutral)
    out = Path(args.out)
    stage_params = {"model": model_cfg, "diffusion": asdict(dcfg), "train": asdict(tcfg)}
    with rank_zero_run("pretrain", params, stage_params, rank) as run:
        run.set_tags({"fingerprint": run_id})
        run.log_metrics({"num_params": count_params(model)})
        t0 = time.time()
        result = train(model, diffusion, images, tcfg, out / "checkpoints", fingerprint=run_id,
                       log_fn=run.log_metrics)
        seconds = time.time() - t0
        if rank != 0:
            return
        save_model(out / "model.pt", model_cfg=model_cfg, diffusion_cfg=asdict(dcfg), image_shape=images.shape[1:],
                   state_dict=result["model"].state_dict(), ema_state_dict=result["ema"].state_dict(),
                   diffusion_state=diffusion.state_dict(),
                   meta={"steps": tcfg.steps, "images_seen": result["images_seen"], "fingerprint": run_id,
                         "data_sha256": data_sha, "num_params": count_params(model)})
        write_text(history_csv(result["history"]), args.plot)
        last = result["history"][-max(1, len(result["history"]) // 10):]
        metrics = {"final_loss": sum(r["loss"] for r in last) / len(last), "num_params": count_params(model),
                   "images_seen": result["images_seen"], "train_seconds_this_run": seconds,
                   "resumed_from_step": result["resumed_from"] or 0}
        report_metrics(run, metrics, args.metrics, log, exclude=("num_params",))
        run.log_artifact(out / "model.pt")
        run.log_artifact(args.plot)


def configure(parser) -> None:
    add_paths(parser, "data", out="models/unified", metrics="metrics/pretrain.json", plot=ARTIFACTS["history"])


if __name__ == "__main__":
    run_stage("pretrain", main, configure)
