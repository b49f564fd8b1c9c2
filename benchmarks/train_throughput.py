"""Training throughput: the project's training step against diffusers' at equal parameters and batch.

    python benchmarks/train_throughput.py --json train_throughput.json
    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --devices cpu --modes eager --rounds 7

stepwise: `stepwise.training.train()` itself, driven for warm-up + timed + 1 steps per round (timestep sampler, loss
through `Diffusion`, AdamW, grad clipping, EMA, per-bin diagnostics, logging every train.log_every steps); the
timed span runs from the start of the first timed step to the start of the step after the last, read off a
wrapper around the configured timestep sampler. diffusers: the loop of its
examples/unconditional_image_generation/train_unconditional.py: `DDPMScheduler.add_noise`, `UNet2DModel`, MSE,
`clip_grad_norm_(1.0)`, AdamW with a cosine warm-up schedule, `EMAModel.step`, the per-step `loss.item()` log. Both
draw batches from the same uint8 images resident on the device (the script's PIL data loader is left out) and use
the same architecture (benchmarks/throughput.py: `diffusers_unet`). Rounds alternate A B A B in one process.
"""
from __future__ import annotations

import copy
import sys
import tempfile
from argparse import RawDescriptionHelpFormatter
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from throughput import (PAIR, ArgumentParser, BenchError, Clock, bf16, check_common, common_arguments, conf_defaults,
                        count_flops, count_params, diffusers_unet, environment, finish, import_diffusers,
                        interleaved, matmul_peak, prepare, print_table, project_unet, rates, run_main)


class TimedSampler:
    """The configured timestep sampler, marking the clock when train() asks it for the steps in `at`."""

    def __init__(self, sampler, clock: Clock, at: tuple[int, ...]):
        self.inner, self.clock, self.at = sampler, clock, at

    def sample(self, batch: int, step: int):
        if step in self.at:
            self.clock.mark()
        return self.inner.sample(batch, step)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def stepwise_run(model, diffusion, images, tcfg, device, mode: str, warmup: int, steps: int) -> dict:
    """train() for warmup + steps + 1 steps; times steps [warmup, warmup + steps)."""
    from stepwise.training import timestep_sampler_from_config, train

    cfg = replace(tcfg, steps=warmup + steps + 1, device=str(device),
                  precision="bf16" if bf16(device, mode) else "fp32",
                  ckpt_every=tcfg.log_every * 10**6, eval_steps=[])
    clock = Clock(device)
    sampler = TimedSampler(timestep_sampler_from_config(cfg, diffusion.to(device)), clock, (warmup, warmup + steps))
    with tempfile.TemporaryDirectory() as ckpt_dir:
        train(model, diffusion, images, cfg, ckpt_dir, fingerprint="throughput", sampler=sampler, progress=False)
    seconds, cpu_seconds = clock.span()
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "images": steps * tcfg.batch_size}


def diffusers_run(model, images, tcfg, device, mode: str, warmup: int, steps: int) -> dict:
    """train_unconditional.py's loop for warmup + steps + 1 steps (fresh optimiser, schedule and EMA, as train())."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    fast_cuda = bf16(device, mode)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2),
                            weight_decay=tcfg.weight_decay, eps=1e-8, fused=fast_cuda)
    total = warmup + steps + 1
    lr_schedule = get_scheduler("cosine", optimizer=opt, num_warmup_steps=tcfg.warmup_steps,
                                num_training_steps=total)
    ema = EMAModel(model.parameters(), decay=tcfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   foreach=fast_cuda, model_cls=UNet2DModel, model_config=model.config)
    data = images.to(device)  # (N, C, H, W) uint8
    clock = Clock(device)
    model.train()
    for step in range(total):
        if step in (warmup, warmup + steps):
            clock.mark()
        idx = torch.randint(0, len(data), (tcfg.batch_size,), device=device)  # (B,)
        clean = data[idx].float() / 127.5 - 1  # (B, C, H, W), what the script's Normalize([0.5], [0.5]) gives
        noise = torch.randn(clean.shape, device=device)  # (B, C, H, W)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (tcfg.batch_size,), device=device)
        noisy = scheduler.add_noise(clean, noise, timesteps)  # (B, C, H, W)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast_cuda):
            pred = model(noisy, timesteps).sample  # (B, C, H, W)
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_schedule.step()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        logs = {"loss": loss.detach().item(), "lr": lr_schedule.get_last_lr()[0], "step": step + 1,
                "ema_decay": ema.cur_decay_value}
    del logs
    seconds, cpu_seconds = clock.span()
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "images": steps * tcfg.batch_size}


def main(argv=None) -> int:
    defaults = conf_defaults()
    parser = ArgumentParser(prog="train_throughput", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    common_arguments(parser, defaults)
    parser.add_argument("--batch-size", type=int, default=defaults["train"]["batch_size"],
                        help="images per step for both (default: conf/train/default.yaml)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each round (default 2)")
    parser.add_argument("--profile", metavar="TXT", help="also profile a stepwise round per device (fp32 eager) with "
                        "torch.profiler and write the top operators by self time to TXT")
    args = parser.parse_args(argv)
    args.model = {**defaults["model"], "base_channels": args.base_channels}
    check_common(args)
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.warmup < 0:
        raise BenchError(f"--warmup={args.warmup} must be >= 0")
    import_diffusers()
    from stepwise.config import DiffusionConfig, TrainConfig, parse
    from stepwise.diffusion import Diffusion

    if args.threads:
        torch.set_num_threads(args.threads)
    tcfg = replace(parse(TrainConfig, defaults["train"], "train"), batch_size=args.batch_size)
    dcfg = asdict(parse(DiffusionConfig, defaults["diffusion"], "diffusion"))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(1024, args.batch_size), args.channels, args.image_size, args.image_size),
                           generator=gen, dtype=torch.uint8)  # (N, C, H, W): throughput does not depend on content
    base = {"stepwise": project_unet(args.model, args.image_size, args.channels),
            "diffusers": diffusers_unet(args.model, args.image_size, args.channels)}
    params = {name: count_params(m) for name, m in base.items()}
    print(f"parameters: stepwise {params['stepwise']:,}  diffusers {params['diffusers']:,}  "
          f"({100 * (params['diffusers'] / params['stepwise'] - 1):+.2f} %)")

    def runner(name, model, device, mode, warmup, steps):
        if name == "stepwise":
            diffusion = Diffusion.from_config(dcfg)
            return lambda: stepwise_run(model, diffusion, images, tcfg, device, mode, warmup, steps)
        return lambda: diffusers_run(model, images, tcfg, device, mode, warmup, steps)

    torch.manual_seed(0)
    cpu = torch.device("cpu")  # the counted run is 2 steps: the timed one and the one after it
    flops = {name: count_flops(runner(name, copy.deepcopy(m), cpu, "eager", 0, 1)) / (2 * args.batch_size)
             for name, m in base.items()}
    print("FLOPs per training step (FlopCounterMode): " +
          "  ".join(f"{n} {flops[n] * args.batch_size / 1e9:.3f} GFLOP" for n in PAIR))
    result = {"benchmark": "train_throughput", "batch_size": args.batch_size, "rounds": args.rounds,
              "steps_per_round": args.steps, "warmup_steps": args.warmup, "image_shape": [args.channels,
              args.image_size, args.image_size], "params": params,
              "params_rel_diff": abs(params["diffusers"] - params["stepwise"]) / params["stepwise"],
              "model": args.model, "diffusers_config": dict(base["diffusers"].config),
              "flops_per_step": {n: flops[n] * args.batch_size for n in PAIR},
              "environment": environment(args.devices), "results": []}
    for dev in args.devices:
        device = torch.device(dev)
        for mode in args.modes:
            dtype = torch.bfloat16 if bf16(device, mode) else torch.float32
            peak = (args.peak_tflops * 1e12,) * 2 if args.peak_tflops else matmul_peak(device, dtype)
            models, first = {}, {}
            for name, m in base.items():
                models[name], setup = prepare(copy.deepcopy(m), device, mode)
                first[name] = setup + runner(name, models[name], device, mode, 0, 1)()["seconds"]  # compiles
            runs = interleaved(args.rounds, {name: runner(name, models[name], device, mode, args.warmup, args.steps)
                                             for name in PAIR})
            row = {"device": dev, "mode": mode, "dtype": str(dtype).removeprefix("torch."), "peak_flop_s": peak[0],
                   "peak_flop_s_cpu_time": peak[1],
                   "peak_source": "--peak-tflops" if args.peak_tflops else "matmul probe",
                   **rates(runs, flops, peak, device)}
            for name in PAIR:
                row[name]["first_call_s"] = first[name]
                row[name]["flops_per_step"] = flops[name] * args.batch_size
            result["results"].append(row)
    print(f"batch {args.batch_size}, {args.rounds} rounds of {args.steps} timed steps, "
          f"{torch.get_num_threads()} CPU threads; ratio = stepwise/diffusers img/s per round")
    print_table(result["results"])
    if args.profile:
        from stepwise.io import write_text

        tables = [profile_table(runner("stepwise", prepare(copy.deepcopy(base["stepwise"]), torch.device(dev),
                                                           "eager")[0], torch.device(dev), "eager", args.warmup,
                                       args.steps), dev) for dev in args.devices]
        write_text("\n\n".join(tables) + "\n", args.profile)
        print("\n\n".join(tables))
    finish(result, args.json)
    if result["banned_imports"]:
        print(f"warning: imported {result['banned_imports']}", file=sys.stderr)
    return 0


def profile_table(run, device: str, rows: int = 20) -> str:
    """torch.profiler's operator table (top `rows` by self time) of one round `run()` on `device`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        run()
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return f"stepwise training round on {device} (fp32 eager), top operators by self time:\n" + \
        prof.key_averages().table(sort_by=sort, row_limit=rows)


if __name__ == "__main__":
    sys.exit(run_main(main, "train_throughput"))
