"""Sampling throughput: DDIM images/s of the project's sampler against diffusers' at equal parameters and batch.

    python benchmarks/sample_throughput.py --json sample_throughput.json
    OMP_NUM_THREADS=1 python benchmarks/sample_throughput.py --devices cpu --modes eager --steps 25 100

stepwise: `stepwise.sampling.generate(sampler="ddim")` (deterministic DDIM, eta = 0, x0 clipped to [-1, 1], the
project's seeded noise). diffusers: the loop of its DDIMPipeline without the numpy conversion: `DDIMScheduler`
(the project's beta schedule, "linspace" timestep spacing, clip_sample) stepping `UNet2DModel`, same architecture
(benchmarks/throughput.py: `diffusers_unet`). One batch of --batch-size images per round, rounds alternate A B A B
in one process, for each number of DDIM steps.
"""
from __future__ import annotations

import copy
import sys
from argparse import RawDescriptionHelpFormatter

import torch

from throughput import (PAIR, ArgumentParser, BenchError, Clock, bf16, check_common, common_arguments, conf_defaults,
                        count_flops, count_params, diffusers_unet, environment, finish, import_diffusers,
                        interleaved, matmul_peak, prepare, print_table, project_unet, rates, run_main)

DIFFUSERS_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # project schedule -> beta_schedule


def stepwise_run(model, diffusion, batch: int, shape: tuple, steps: int, device, mode: str) -> dict:
    from stepwise.sampling import generate

    clock = Clock(device)
    clock.mark()
    generate(model, diffusion, batch, shape, sampler="ddim", steps=steps, seed=0, batch_size=batch, device=device,
             amp_dtype=torch.bfloat16 if bf16(device, mode) else None, progress=False)
    clock.mark()
    seconds, cpu_seconds = clock.span()
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "images": batch}


@torch.no_grad()
def diffusers_run(model, scheduler, batch: int, shape: tuple, steps: int, device, mode: str) -> dict:
    """DDIMPipeline.__call__'s loop (eta = 0), ending with the images on the CPU in [0, 1]."""
    clock = Clock(device)
    clock.mark()
    model.eval()
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *shape), generator=gen).to(device)  # (B, C, H, W)
    for t in scheduler.timesteps:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16(device, mode)):
            out = model(x, t).sample  # (B, C, H, W)
        x = scheduler.step(out, t, x, eta=0.0, generator=gen).prev_sample  # (B, C, H, W)
    (x / 2 + 0.5).clamp(0, 1).float().cpu()
    clock.mark()
    seconds, cpu_seconds = clock.span()
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "images": batch}


def main(argv=None) -> int:
    defaults = conf_defaults()
    parser = ArgumentParser(prog="sample_throughput", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    common_arguments(parser, defaults)
    parser.add_argument("--batch-size", type=int, default=64, help="images per round for both (default 64)")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 100], help="DDIM steps (default: 25 100)")
    args = parser.parse_args(argv)
    args.model = {**defaults["model"], "base_channels": args.base_channels}
    check_common(args)
    T = defaults["diffusion"]["T"]
    if args.batch_size < 1:
        raise BenchError(f"--batch-size={args.batch_size} must be >= 1")
    for s in args.steps:
        if not 1 <= s <= T:
            raise BenchError(f"--steps {s} must be in [1, T={T}]")
    if defaults["diffusion"]["schedule"] not in DIFFUSERS_SCHEDULES:
        raise BenchError(f"schedule {defaults['diffusion']['schedule']!r} has no diffusers equivalent here")
    import_diffusers()
    from diffusers import DDIMScheduler

    from stepwise.diffusion import Diffusion

    if args.threads:
        torch.set_num_threads(args.threads)
    diffusion = Diffusion.from_config(defaults["diffusion"])
    scheduler = DDIMScheduler(num_train_timesteps=T,
                              beta_schedule=DIFFUSERS_SCHEDULES[defaults["diffusion"]["schedule"]],
                              beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T, clip_sample=True,
                              set_alpha_to_one=True, timestep_spacing="linspace", prediction_type="epsilon")
    shape = (args.channels, args.image_size, args.image_size)
    base = {"stepwise": project_unet(args.model, args.image_size, args.channels),
            "diffusers": diffusers_unet(args.model, args.image_size, args.channels)}
    params = {name: count_params(m) for name, m in base.items()}
    print(f"parameters: stepwise {params['stepwise']:,}  diffusers {params['diffusers']:,}  "
          f"({100 * (params['diffusers'] / params['stepwise'] - 1):+.2f} %)")

    def runner(name, model, steps, device, mode):
        if name == "stepwise":
            return lambda: stepwise_run(model, diffusion.to(device), args.batch_size, shape, steps, device, mode)
        return lambda: diffusers_run(model, scheduler, args.batch_size, shape, steps, device, mode)

    cpu = torch.device("cpu")  # FLOPs of one denoiser evaluation of the batch; a run of S steps does S of them
    flops_eval = {name: count_flops(runner(name, copy.deepcopy(m), 1, cpu, "eager")) / args.batch_size
                  for name, m in base.items()}
    print("FLOPs per denoiser evaluation of the batch (FlopCounterMode): " +
          "  ".join(f"{n} {flops_eval[n] * args.batch_size / 1e9:.3f} GFLOP" for n in PAIR))
    result = {"benchmark": "sample_throughput", "batch_size": args.batch_size, "rounds": args.rounds,
              "sampler": "ddim", "image_shape": list(shape), "params": params,
              "params_rel_diff": abs(params["diffusers"] - params["stepwise"]) / params["stepwise"],
              "model": args.model, "diffusers_config": dict(base["diffusers"].config),
              "flops_per_step": {n: flops_eval[n] * args.batch_size for n in PAIR},
              "environment": environment(args.devices), "results": []}
    for dev in args.devices:
        device = torch.device(dev)
        for mode in args.modes:
            dtype = torch.bfloat16 if bf16(device, mode) else torch.float32
            peak = (args.peak_tflops * 1e12,) * 2 if args.peak_tflops else matmul_peak(device, dtype)
            models, first = {}, {}
            for name, m in base.items():
                models[name], setup = prepare(copy.deepcopy(m), device, mode)
                first[name] = setup + runner(name, models[name], 1, device, mode)()["seconds"]  # compiles
            for steps in args.steps:
                runs = interleaved(args.rounds,
                                   {name: runner(name, models[name], steps, device, mode) for name in PAIR})
                flops = {n: flops_eval[n] * steps for n in PAIR}
                row = {"device": dev, "mode": mode, "steps": steps, "dtype": str(dtype).removeprefix("torch."),
                       "peak_flop_s": peak[0], "peak_flop_s_cpu_time": peak[1],
                       "peak_source": "--peak-tflops" if args.peak_tflops else "matmul probe",
                       **rates(runs, flops, peak, device)}
                for name in PAIR:
                    row[name]["first_call_s"] = first[name]
                result["results"].append(row)
    print(f"batch {args.batch_size}, {args.rounds} rounds, {torch.get_num_threads()} CPU threads; "
          "ratio = stepwise/diffusers img/s per round")
    print_table(result["results"], "steps")
    finish(result, args.json)
    if result["banned_imports"]:
        print(f"warning: imported {result['banned_imports']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "sample_throughput"))
