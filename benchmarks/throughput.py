"""What the throughput benchmarks (train_throughput.py, sample_throughput.py) share: the diffusers UNet2DModel matched
to the project's UNet, the modes, FLOP counting, the device's peak, interleaved timed rounds and the report.

Needs torch and diffusers only: conf/ is read as plain YAML (no Hydra), and nothing from DVC, MLflow or Prefect is
imported (`banned_imports()` checks sys.modules).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a plain checkout runs the benchmarks without `pip install -e .` (torch-only images)
    sys.path.insert(0, str(REPO))
BANNED = ("dvc", "mlflow", "prefect", "hydra", "omegaconf")
MODES = ("eager", "fast")
PAIR = ("stepwise", "diffusers")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exits with status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class BenchError(Exception):
    """A bad argument found after parsing; main() prints it in one line and exits with status 2."""


def common_arguments(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument("--devices", nargs="+", choices=("cpu", "cuda"),
                        default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"],
                        help="devices to measure (default: cpu, and cuda when available)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="eager: fp32 eager; fast: the project's fastest (cuda: bf16 autocast, channels_last, "
                             "torch.compile, fused AdamW; cpu: torch.compile)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds per model (default 5)")
    parser.add_argument("--base-channels", type=int, default=defaults["model"]["base_channels"],
                        help="UNet width (default: conf/model/unet.yaml); the other settings come from that file")
    parser.add_argument("--image-size", type=int, default=28, help="square images (default 28, Fashion-MNIST)")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, help="device peak in TFLOP/s (default: a matmul probe)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, e.g. OMP_NUM_THREADS)")
    parser.add_argument("--json", help="also write the results here")


def check_common(args) -> None:
    """Reject bad common arguments before any model is built."""
    for name in ("rounds", "base_channels", "image_size", "channels"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads={args.threads} must be >= 1")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise BenchError(f"--peak-tflops={args.peak_tflops} must be > 0")
    if "cuda" in args.devices and not torch.cuda.is_available():
        raise BenchError("--devices cuda: no CUDA device is available")
    levels = len(args.model["channel_mult"])
    if args.image_size % 2 ** (levels - 1):
        raise BenchError(f"--image-size={args.image_size} must be divisible by {2 ** (levels - 1)}: diffusers' UNet "
                         f"upsamples by exactly 2 at each of its {levels - 1} levels")
    widths = [args.base_channels * m for m, a in zip(args.model["channel_mult"],
                                                     attention_levels(args.model, args.image_size)) if a]
    if widths and min(widths) < args.model["head_dim"]:
        raise BenchError(f"--base-channels={args.base_channels} gives attention layers of {min(widths)} channels, "
                         f"fewer than head_dim={args.model['head_dim']}")


def conf_defaults(root: Path = REPO) -> dict:
    """The default model/diffusion/train/sample sections of conf/ (Hydra defaults list read as YAML)."""
    cfg = yaml.safe_load((root / "conf" / "config.yaml").read_text())
    groups = {k: v for item in cfg["defaults"] if isinstance(item, dict) for k, v in item.items()}
    return {g: yaml.safe_load((root / "conf" / g / f"{groups[g]}.yaml").read_text())
            for g in ("model", "diffusion", "train", "sample")}


def import_diffusers():
    """diffusers, or a BenchError that says how to install it."""
    try:
        import diffusers
    except ImportError:
        raise BenchError("diffusers is not installed: pip install 'stepwise[bench]'") from None
    return diffusers


def attention_levels(model_cfg: dict, image_size: int) -> list[bool]:
    """Per UNet level, whether the project's UNet puts attention there (its resolution is in attn_resolutions)."""
    res, out = image_size, []
    for _ in model_cfg["channel_mult"]:
        out.append(res in model_cfg["attn_resolutions"])
        res = (res + 1) // 2
    return out


def project_unet(model_cfg: dict, image_size: int, channels: int, seed: int = 0) -> torch.nn.Module:
    from stepwise.models import build_model

    return build_model(model_cfg, image_size=image_size, channels=channels, seed=seed)


def diffusers_unet(model_cfg: dict, image_size: int, channels: int) -> torch.nn.Module:
    """diffusers' UNet2DModel with the project UNet's architecture: widths, blocks per level, attention levels and
    head size, FiLM (scale-shift) time conditioning, GroupNorm in attention, zero padding. Norm groups: one count,
    gcd(32, widths), where the project takes gcd(32, width) per layer (same parameters, near-equal work)."""
    from diffusers import UNet2DModel

    widths = tuple(model_cfg["base_channels"] * m for m in model_cfg["channel_mult"])
    attn = attention_levels(model_cfg, image_size)
    groups = math.gcd(32, *widths)
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels, block_out_channels=widths,
        layers_per_block=model_cfg["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        norm_num_groups=groups, attn_norm_num_groups=groups, attention_head_dim=model_cfg["head_dim"],
        resnet_time_scale_shift="scale_shift", dropout=model_cfg.get("dropout", 0.0))


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def prepare(model: torch.nn.Module, device: torch.device, mode: str) -> tuple[torch.nn.Module, float]:
    """`model` on `device` set up for `mode` (fast: channels_last on CUDA, torch.compile); (model, seconds)."""
    t0 = time.perf_counter()
    model = model.to(device)
    if mode == "fast":
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        model.compile()  # in place: state_dict keys and attributes stay those of the module
    return model, time.perf_counter() - t0


def bf16(device: torch.device, mode: str) -> bool:
    return mode == "fast" and device.type == "cuda"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and process CPU time at marks, synchronising the device first."""

    def __init__(self, device: torch.device):
        self.device, self.marks = device, []

    def mark(self) -> None:
        sync(self.device)
        self.marks.append((time.perf_counter(), time.process_time()))

    def span(self) -> tuple[float, float]:
        (w0, c0), (w1, c1) = self.marks[0], self.marks[-1]
        return w1 - w0, c1 - c0


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls, convolutions and attention `fn` runs, as torch.utils.flop_counter counts them (plus the
    CPU flash-attention kernels, which it leaves out, with its own attention formulas)."""
    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(g, q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(wall, process-CPU-time) FLOP/s of the best of several square matmuls: an attainable peak for this device,
    dtype and thread count (the CPU-time one discounts time the process spent waiting for a core)."""
    n = 1024 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    wall = cpu = 0.0
    for _ in range(5):
        clock = Clock(device)
        clock.mark()
        for _ in range(3):
            a @ b
        clock.mark()
        seconds, cpu_seconds = clock.span()
        wall, cpu = max(wall, 3 * 2 * n**3 / seconds), max(cpu, 3 * 2 * n**3 / max(cpu_seconds, 1e-9))
    return wall, cpu


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def median_interval(values: list[float], level: float = 0.95, resamples: int = 2000) -> list[float]:
    """Percentile-bootstrap interval of the median of `values` (fixed seed: the same data give the same interval)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    lo = int((1 - level) / 2 * resamples)
    return [medians[lo], medians[resamples - 1 - lo]]


def interleaved(rounds: int, runners: dict[str, Callable[[], dict]]) -> dict[str, list[dict]]:
    """Run the runners in turn, A B A B ..., `rounds` times; each returns {'seconds', 'cpu_seconds', 'images'}."""
    out = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            out[name].append(run())
    return out


def rates(results: dict[str, list[dict]], flops: dict[str, float], peak: tuple[float, float],
          device: torch.device) -> dict:
    """Per model img/s (wall; on the CPU also per process CPU second), FLOP/s and peak fraction; the per-round and
    median ratios. `peak` is (wall, CPU-time) FLOP/s."""
    row = {}
    for name, runs in results.items():
        img_s = [r["images"] / r["seconds"] for r in runs]
        entry = {"img_s": summary(img_s), "flops_per_image": flops[name],
                 "flop_s": statistics.median(img_s) * flops[name]}
        entry["peak_fraction"] = entry["flop_s"] / peak[0]
        if device.type == "cpu":
            entry["cpu_img_s"] = summary([r["images"] / r["cpu_seconds"] for r in runs])
            entry["cpu_flop_s"] = entry["cpu_img_s"]["median"] * flops[name]
            entry["cpu_peak_fraction"] = entry["cpu_flop_s"] / peak[1]
        row[name] = entry
    a, b = (row[n]["img_s"]["values"] for n in PAIR)
    row["ratio"] = summary([x / y for x, y in zip(a, b)])  # stepwise / diffusers, paired by round
    row["ratio"]["ci95"] = median_interval(row["ratio"]["values"])
    row["ratio_of_medians"] = row["stepwise"]["img_s"]["median"] / row["diffusers"]["img_s"]["median"]
    if device.type == "cpu":
        a, b = (row[n]["cpu_img_s"]["values"] for n in PAIR)
        row["cpu_time_ratio"] = summary([x / y for x, y in zip(a, b)])
        row["cpu_time_ratio"]["ci95"] = median_interval(row["cpu_time_ratio"]["values"])
    return row


def environment(devices) -> dict:
    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "cores_available": len(os.sched_getaffinity(0)),
           "cpu": platform.processor() or platform.machine(), "loadavg_start": os.getloadavg()}
    if "cuda" in devices:
        env["gpu"] = torch.cuda.get_device_name()
    return env


def banned_imports() -> list[str]:
    """Orchestration packages the benchmark must not have imported."""
    return sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in BANNED})


def print_table(rows: list[dict], label: str = "") -> None:
    """One line per model and row: wall-clock img/s and the per-round ratio's median [min, max]; on the CPU also img/s
    per process CPU second (less sensitive to other load) and its ratio's median [bootstrap 95 % interval]."""
    print(f"{'device':6} {'mode':5} {label:>5} {'model':9} {'img/s median [min, max]':>27} {'GFLOP/img':>9} "
          f"{'GFLOP/s':>7} {'%peak':>6} {'ratio [min, max]':>21} | {'CPU-time img/s':>14} {'%peak':>6} {'ratio [95% CI]':>22}")
    for row in rows:
        for name in PAIR:
            e, s = row[name], row[name]["img_s"]
            r = row["ratio"]
            ratio = f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]" if name == "stepwise" else ""
            line = (f"{row['device']:6} {row['mode']:5} {row.get(label, ''):>5} {name:9} "
                    f"{s['median']:9.1f} [{s['min']:7.1f}, {s['max']:7.1f}] {e['flops_per_image'] / 1e9:9.3f} "
                    f"{e['flop_s'] / 1e9:7.1f} {100 * e['peak_fraction']:5.1f}% {ratio:>21}")
            if "cpu_img_s" in e:
                c = row["cpu_time_ratio"]
                cr = f"{c['median']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]" if name == "stepwise" else ""
                line += f" | {e['cpu_img_s']['median']:14.1f} {100 * e['cpu_peak_fraction']:5.1f}% {cr:>22}"
            print(line)


def finish(result: dict, path: str | None) -> None:
    result["environment"]["loadavg_end"] = os.getloadavg()
    result["banned_imports"] = banned_imports()
    if path:
        from stepwise.io import write_json

        write_json(result, path)


def run_main(main: Callable[[list[str] | None], int], prog: str, argv=None) -> int:
    """main(argv), with a BenchError printed as one line `prog: error: ...` and exit status 2."""
    try:
        return main(argv)
    except BenchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
