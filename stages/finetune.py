"""DVC stages `finetune@i` and `continue_unified`: TDC stage-2 experts and their compute-matched baseline.

`--group i` fine-tunes expert i (TDC, arXiv 2312.13307, stage 2): a copy of the unified model (its raw weights, or
its EMA weights with tdc.finetune.init=ema) trained only on timesteps of group i's [lo, hi) from groups.json, with
the timestep sampler of the `train` section (overridable in tdc.finetune.train) restricted to that range.
`--continue-unified` is the baseline: the same copy trained on all of [0, T) for num_groups x tdc.finetune.steps
steps at the same batch size, i.e. exactly as many images as all experts together.

Both are resumable from their own checkpoints (a persistent DVC output) and record images seen, training FLOPs and
the smallest/largest timestep the sampler emitted.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from stepwise.checkpoint import fingerprint, load_denoiser, load_model_file, save_model
from stepwise.config import parse
from stepwise.data import load_split, sha256
from stepwise.errors import ConfigError, StepwiseError
from stepwise.grouping import groups_from_dict
from stepwise.models import count_params
from stepwise.seeding import derive_seed
from stepwise.tdc_config import FinetuneConfig, num_groups
from stepwise.training import build_sampler, resolve_device, train

from .common import add_paths, load_params, report_metrics, run_stage, section, stage_run
from .pretrain import RESUME_NEUTRAL

log = logging.getLogger("stepwise.finetune")
FLOPS_PER_MAC = 2
TRAIN_PASSES = 3  # forward + backward ~ 3 forwards (Kaplan et al. 2020, arXiv 2001.08361, Sec. 2.1)


class RangeRecorder:
    """Wraps a TimestepSampler: counts every emitted t (kept in its state, so across resumes) and rejects any t
    outside [lo, hi) the moment it is drawn."""

    def __init__(self, sampler, lo: int, hi: int):
        self.sampler, self.lo, self.hi = sampler, lo, hi
        self.counts = torch.zeros(sampler.T, dtype=torch.long)  # (T,)

    def probs(self, step: int) -> torch.Tensor:
        return self.sampler.probs(step)

    def sample(self, batch: int, step: int):
        t, w = self.sampler.sample(batch, step)  # (B,), (B,)
        if int(t.min()) < self.lo or int(t.max()) >= self.hi:
            raise StepwiseError(f"timestep sampler emitted t in [{int(t.min())}, {int(t.max())}] outside the group's "
                                f"range [{self.lo}, {self.hi}) at step {step}")
        self.counts += torch.bincount(t.cpu(), minlength=len(self.counts))
        return t, w

    def update(self, t, losses) -> None:
        self.sampler.update(t, losses)

    def state_dict(self) -> dict:
        return {"inner": self.sampler.state_dict(), "t_counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["inner"])
        self.counts.copy_(state["t_counts"])

    def seen(self) -> dict:
        """{'t_min', 't_max', 't_distinct', 't_draws'} of every timestep emitted so far."""
        nz = torch.nonzero(self.counts).flatten()
        if not len(nz):
            return {"t_min": -1, "t_max": -1, "t_distinct": 0, "t_draws": 0}
        return {"t_min": int(nz.min()), "t_max": int(nz.max()), "t_distinct": len(nz),
                "t_draws": int(self.counts.sum())}


def run_seed(seed: int, index: int) -> int:
    """train.seed of fine-tuning run `index` (group i, or -1 for the continued baseline): 31 bits of derive_seed."""
    return derive_seed(seed, index) % 2**31


def forward_macs(model: torch.nn.Module, image_shape, device) -> int:
    """Multiply-accumulates of one forward pass on one image (torch.utils.flop_counter: conv, matmul, attention)."""
    x = torch.zeros(1, *image_shape, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    model.train(was_training)
    return int(counter.get_total_flops()) // FLOPS_PER_MAC


def main(args) -> None:
    params = load_params(args.params)
    tdc = section(params, "tdc")
    unified = load_model_file(args.unified)
    T = int(unified["diffusion"]["T"])
    K = num_groups(tdc, T)
    fcfg = parse(FinetuneConfig, section(params, "tdc", "finetune"), "tdc.finetune")
    if args.continue_unified:
        stage, group, (lo, hi), steps = "continue_unified", -1, (0, T), K * fcfg.steps
    else:
        if not 0 <= args.group < K:
            raise ConfigError(f"--group {args.group} is not a group index: tdc.num_groups={K}")
        if not Path(args.groups).is_file():
            raise ConfigError(f"{args.groups}: not found; run `dvc repro cluster`")
        record = json.loads(Path(args.groups).read_text())
        groups = groups_from_dict(record)
        if len(groups) != K or int(record["T"]) != T:
            raise ConfigError(f"{args.groups} holds {len(groups)} groups of T={record['T']} but tdc.num_groups={K}, "
                              f"T={T}: rerun `dvc repro cluster`")
        stage, group, (lo, hi), steps = f"finetune@{args.group}", args.group, groups[args.group], fcfg.steps
    tcfg = fcfg.train_config(section(params, "train"), seed=run_seed(fcfg.seed, group), steps=steps)
    model, diffusion, shape = load_denoiser(args.unified, use_ema=fcfg.init == "ema")
    sampler = RangeRecorder(build_sampler(tcfg, diffusion, t_range=(lo, hi)), lo, hi)
    images, _, _ = load_split(f"{args.data}/train.pt")
    if tuple(images.shape[1:]) != tuple(shape):
        raise ConfigError(f"{args.unified} was trained on images {list(shape)}, the data are "
                          f"{list(images.shape[1:])}: rerun `dvc repro pretrain`")
    data_sha = json.loads(Path(args.data, "card.json").read_text())["splits"]["train"]["sha256"]
    unified_sha = sha256(args.unified)
    neutral = set(RESUME_NEUTRAL)
    if tcfg.momentum_decay != "none" and "total_steps" not in tcfg.momentum_decay_args:
        neutral.discard("steps")  # as in pretrain: the momentum schedule spans train.steps
    run_id = fingerprint(unified_sha, {k: v for k, v in asdict(tcfg).items() if k not in neutral}, [lo, hi],
                         fcfg.init, data_sha)
    device = resolve_device(tcfg.device)
    macs = forward_macs(model.to(device), shape, device)
    out = Path(args.out)
    stage_params = {"tdc": {"finetune": asdict(fcfg), "num_groups": K}, "train_effective": asdict(tcfg),
                    "group": {"index": group, "lo": lo, "hi": hi}}
    with stage_run(stage, params, stage_params) as run:
        run.set_tags({"fingerprint": run_id, "tdc.group": str(group), "tdc.t_range": f"[{lo}, {hi})",
                      "tdc.role": "baseline" if args.continue_unified else "expert"})
        t0 = time.time()
        result = train(model, diffusion, images, tcfg, out / "checkpoints", fingerprint=run_id, sampler=sampler,
                       log_fn=run.log_metrics)
        seconds = time.time() - t0
        seen = sampler.seen()
        if seen["t_draws"] and not (lo <= seen["t_min"] and seen["t_max"] < hi):
            raise StepwiseError(f"{stage}: trained on t in [{seen['t_min']}, {seen['t_max']}] outside [{lo}, {hi})")
        images_seen = result["images_seen"]
        flops = TRAIN_PASSES * FLOPS_PER_MAC * macs * images_seen
        meta = {"steps": tcfg.steps, "images_seen": images_seen, "fingerprint": run_id, "data_sha256": data_sha,
                "unified_sha256": unified_sha, "group": group, "lo": lo, "hi": hi, "init": fcfg.init,
                "macs_per_forward": macs, "train_flops": flops, "num_params": count_params(model), **seen}
        save_model(out / "model.pt", model_cfg=unified["model"], diffusion_cfg=unified["diffusion"],
                   image_shape=shape, state_dict=result["model"].state_dict(),
                   ema_state_dict=result["ema"].state_dict(), diffusion_state=diffusion.state_dict(), meta=meta)
        last = result["history"][-max(1, len(result["history"]) // 10):]
        metrics = {"group": group, "lo": lo, "hi": hi, "steps": tcfg.steps, "batch_size": tcfg.batch_size,
                   "images_seen": images_seen, "macs_per_forward": macs, "train_flops": flops,
                   "final_loss": sum(r["loss"] for r in last) / len(last), "train_seconds_this_run": seconds,
                   "resumed_from_step": result["resumed_from"] or 0, **seen}
        report_metrics(run, metrics, args.metrics, log, exclude=("group", "lo", "hi"))
        run.log_artifact(out / "model.pt")
        log.info("%s: t in [%d, %d) (seen [%d, %d]), %d images, %.3g training FLOPs", stage, lo, hi, seen["t_min"],
                 seen["t_max"], images_seen, flops)


def configure(parser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--group", type=int, help="fine-tune the expert of this group index")
    mode.add_argument("--continue-unified", action="store_true",
                      help="train the unified model on all t for num_groups x steps (compute-matched baseline)")
    add_paths(parser, "data", "unified", "groups", metrics=None)
    parser.add_argument("--out", required=True, help="e.g. models/experts/0 or models/continued")


if __name__ == "__main__":
    run_stage("finetune", main, configure)
