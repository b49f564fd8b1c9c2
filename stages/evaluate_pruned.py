"""DVC stage `evaluate_pruned`: pruned TDC ensemble vs unified model vs unpruned TDC ensemble (TDC, arXiv 2312.13307).

For each of the three: FID/KID/PR with the `sample`/`eval` settings of `evaluate` (same fixed noise), MACs per
generated sample summed over the sampling trajectory (step k costs the MACs of the model that owns t_k), and
wall-clock sampling throughput (images/s, same batch size, same device, interleaved repeats, fastest kept). The
unified and TDC scores are read from metrics/evaluate.json and metrics/evaluate_tdc.json when their stored samples
were drawn with the current sample settings and count, else recomputed here. The project's goal (>= 40 % fewer MACs
per sample than the unified model at an FID no worse) is reported as metrics `goal.*`, not asserted.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from stepwise.config import EvalConfig, SampleConfig, parse
from stepwise.data import load_split, sha256
from stepwise.errors import CheckpointError, ConfigError, DataError
from stepwise.featnet import load_featnet
from stepwise.fidelity import INCEPTION_WEIGHTS, fidelity_metrics, find_inception_weights
from stepwise.io import write_text
from stepwise.prune_config import PruneEvalConfig
from stepwise.pruning import count_macs, example_inputs
from stepwise.router import ExpertRouter
from stepwise.sampling import generate, timestep_subsequence, to_uint8
from stepwise.tdc_config import num_groups
from stepwise.training import resolve_device

from .common import add_paths, load_params, report_metrics, run_stage, section, stage_run
from .evaluate_tdc import load_router, load_samples, sample_and_save
from .prune import load_pruned

log = logging.getLogger("stepwise.evaluate_pruned")
MODELS = ("unified", "tdc", "pruned")
GOAL_MACS_SAVING = 0.40  # the project's target: >= 40 % fewer MACs per sample than the unified model
GOAL_METRIC = "fid_featnet"  # ... at an FID (FeatNet features, always available offline) no worse than it


def load_pruned_experts(pruned_dir, experts_dir, ranges, use_ema: bool) -> tuple[list, list[dict]]:
    """The pruned experts in group order and their metas; ConfigError if one is stale (other range or expert)."""
    models, metas = [], []
    for i, (lo, hi) in enumerate(ranges):
        path = Path(pruned_dir) / str(i) / "model.pt"
        model, _, _, meta = load_pruned(path, use_ema=use_ema)
        expert = Path(experts_dir) / str(i) / "model.pt"
        if (meta.get("lo"), meta.get("hi")) != (lo, hi) or meta.get("expert_sha256") != sha256(expert):
            raise ConfigError(f"{path} was pruned from another expert or range than {expert} on [{lo}, {hi}): "
                              f"rerun `dvc repro prune@{i}`")
        models.append(model)
        metas.append(meta)
    return models, metas


def trajectory_macs(router: ExpertRouter, expert_macs: list[float], fallback_macs: float,
                    ts: torch.Tensor) -> list[float]:
    """MACs of each sampling step: the MACs of the expert owning t_k, the fallback's where none does: (S,)."""
    return [expert_macs[k] if k >= 0 else fallback_macs for k in router.expert_index(ts).tolist()]


def stored_scores(samples_path, metrics_path, prefix: str, scfg: SampleConfig, num: int) -> dict | None:
    """A model's fidelity scores from an earlier evaluate stage, or None unless its stored samples were drawn with
    the current (sampler, steps, seed) and number of samples."""
    if not Path(samples_path).is_file() or not Path(metrics_path).is_file():
        return None
    try:
        images = load_samples(samples_path, scfg)
    except (ConfigError, DataError) as e:
        log.info("not reusing %s: %s", samples_path, e)
        return None
    if len(images) != num:
        log.info("not reusing %s: %d samples, eval.num_samples=%d", samples_path, len(images), num)
        return None
    metrics = json.loads(Path(metrics_path).read_text())
    scores = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
    return scores if GOAL_METRIC in scores else None


def throughput(models: dict, diffusion, shape, scfg: SampleConfig, pecfg: PruneEvalConfig, device) -> dict:
    """Images/s of each model: `throughput_samples` images at batch min(sample.batch_size, that), repeats
    interleaved across the models, the fastest repeat kept."""
    n = pecfg.throughput_samples
    batch = min(scfg.batch_size, n)
    best = {name: math.inf for name in models}
    for _ in range(pecfg.throughput_repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            generate(model.to(device), diffusion.to(device), n, shape, sampler=scfg.sampler, steps=scfg.steps,
                     eta=scfg.eta, seed=scfg.seed, batch_size=batch, device=device, progress=False,
                     amp_dtype=torch.bfloat16 if device.type == "cuda" else None)  # returns on the CPU: synced
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: n / seconds for name, seconds in best.items()}


def trajectory_csv(ts: torch.Tensor, per_step: dict[str, list[float]]) -> str:
    """step, t, MACs of each model at that step (for `dvc plots`)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["step", "t", *per_step])
    for k, t in enumerate(ts.tolist()):
        w.writerow([k, t, *(per_step[name][k] for name in per_step)])
    return out.getvalue()


def main(args) -> None:
    params = load_params(args.params)
    scfg = parse(SampleConfig, section(params, "sample"), "sample")
    ecfg = parse(EvalConfig, section(params, "eval"), "eval")
    pecfg = parse(PruneEvalConfig, section(params, "tdc", "prune_eval"), "tdc.prune_eval")
    if not ecfg.fid:
        raise ConfigError("eval.fid=false: evaluate_pruned needs FID for its goal check; set eval.fid=true")
    inception = find_inception_weights(ecfg.inception)
    K = num_groups(section(params, "tdc"))
    router, diffusion, shape, _, _ = load_router(args.groups, args.experts, args.unified, K, scfg.use_ema)
    unified = router.fallback
    pruned_experts, pruned_metas = load_pruned_experts(args.pruned, args.experts, router.ranges, scfg.use_ema)
    pruned = ExpertRouter(pruned_experts, router.ranges, fallback=unified)
    test_images, _, _ = load_split(f"{args.data}/test.pt")
    load_featnet(args.featnet)  # a missing or corrupt feature network fails here, before sampling
    for path in (args.unified_metrics, args.tdc_metrics):
        if not Path(path).is_file():
            raise DataError(f"{path}: not found; run `dvc repro evaluate_tdc`")

    inputs = example_inputs(shape[0], shape[1])
    full = count_macs(unified, inputs)
    expert_macs = [count_macs(m, inputs) for m in router.experts]
    pruned_macs = [count_macs(m, inputs) for m in pruned_experts]
    for i, (m, meta) in enumerate(zip(pruned_macs, pruned_metas)):
        if m != meta["macs_per_forward"]:
            raise CheckpointError(f"pruned expert {i}: {m:.6g} MACs measured, {meta['macs_per_forward']:.6g} recorded")
    ts = timestep_subsequence(diffusion.T, scfg.steps)  # (S,)
    per_step = {"unified": [full] * len(ts), "tdc": trajectory_macs(router, expert_macs, full, ts),
                "pruned": trajectory_macs(pruned, pruned_macs, full, ts)}
    per_sample = {name: sum(v) for name, v in per_step.items()}
    device = resolve_device("auto")
    with stage_run("evaluate_pruned", params, {"sample": asdict(scfg), "eval": asdict(ecfg),
                                               "tdc": {"prune_eval": asdict(pecfg), "num_groups": K}}) as run:
        kw = dict(fid=ecfg.fid, kid=ecfg.kid, prc=ecfg.prc, kid_subset_size=ecfg.kid_subset_size,
                  cuda=device.type == "cuda")
        if not inception:
            log.info("Inception-v3 weights (%s) not found: skipping *_inception metrics.", INCEPTION_WEIGHTS)

        def score(images) -> dict:
            s = fidelity_metrics(images, test_images, extractor="featnet", weights_path=args.featnet, **kw)
            if inception:
                s.update(fidelity_metrics(images, test_images, extractor="inception", weights_path=inception, **kw))
            return s

        metrics = {"num_samples": ecfg.num_samples, "sampling_steps": len(ts)}
        images, seconds = sample_and_save(pruned, diffusion, shape, scfg, ecfg.num_samples, device, Path(args.out))
        scores = {"pruned": score(images)}
        metrics["pruned/sampling_seconds"] = seconds
        run.log_artifact(Path(args.out) / "grid.png", "pruned")
        stored = {"unified": (args.unified_samples, args.unified_metrics, ""),
                  "tdc": (args.tdc_samples, args.tdc_metrics, "tdc.")}
        for name, model in (("unified", unified), ("tdc", router)):
            reused = stored_scores(*stored[name], scfg, ecfg.num_samples)
            if reused is None:
                log.info("%s: stored scores were drawn with other sample settings: sampling again", name)
                reused = score(to_uint8(generate(model.to(device), diffusion.to(device), ecfg.num_samples, shape,
                                                 sampler=scfg.sampler, steps=scfg.steps, eta=scfg.eta,
                                                 seed=scfg.seed, batch_size=scfg.batch_size, device=device,
                                                 amp_dtype=torch.bfloat16 if device.type == "cuda" else None)))
                metrics[f"{name}/scores_reused"] = 0.0
            else:
                metrics[f"{name}/scores_reused"] = 1.0
            scores[name] = {k: v for k, v in reused.items() if k in scores["pruned"]}
        speed = throughput({"unified": unified, "tdc": router, "pruned": pruned}, diffusion, shape, scfg, pecfg,
                           device)
        for name in MODELS:
            metrics.update({f"{name}/{k}": v for k, v in scores[name].items()})
            metrics[f"{name}/macs_per_sample"] = per_sample[name]
            metrics[f"{name}/images_per_second"] = speed[name]
        for other in ("unified", "tdc"):
            for k, v in scores["pruned"].items():
                if k in scores[other]:
                    metrics[f"delta_pruned_vs_{other}/{k}"] = v - scores[other][k]
            metrics[f"macs_saving_vs_{other}"] = 1 - per_sample["pruned"] / per_sample[other]
            metrics[f"speedup_vs_{other}"] = speed["pruned"] / speed[other]
        for i, (m, meta) in enumerate(zip(pruned_macs, pruned_metas)):
            metrics.update({f"expert_{i}/macs_fraction": m / full, f"expert_{i}/budget_fraction":
                            meta["budget_macs"] / full, f"expert_{i}/params": meta["num_params"],
                            f"expert_{i}/steps_owned": sum(1 for k in pruned.expert_index(ts).tolist() if k == i)})
        fid_delta = scores["pruned"][GOAL_METRIC] - scores["unified"][GOAL_METRIC]
        saving = metrics["macs_saving_vs_unified"]
        metrics.update({"goal/macs_saving_vs_unified": saving, "goal/fid_delta": fid_delta,
                        "goal/macs_saving_target": GOAL_MACS_SAVING,
                        "goal/met": float(saving >= GOAL_MACS_SAVING and fid_delta <= 0)})
        write_text(trajectory_csv(ts, per_step), args.trajectory)
        report_metrics(run, metrics, args.metrics, log)
        run.log_artifact(args.trajectory)
        log.info("goal: MACs saving vs unified %.3f (target >= %.2f), %s delta %+.4g -> %s", saving,
                 GOAL_MACS_SAVING, GOAL_METRIC, fid_delta, "met" if metrics["goal/met"] else "not met")


def configure(parser) -> None:
    add_paths(parser, "data", "groups", "experts", "pruned", "unified", "featnet", "unified_metrics", "tdc_metrics",
              unified_samples="samples/unified/samples.pt", tdc_samples="samples/tdc/samples.pt", out="samples/pruned",
              trajectory="plots/prune_macs_trajectory.csv", metrics="metrics/evaluate_pruned.json")


if __name__ == "__main__":
    run_stage("evaluate_pruned", main, configure)
