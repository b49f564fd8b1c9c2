"""DVC stage `prune@i`: TDC proxy-based multi-round pruning of expert i to its progressive MACs budget (arXiv 2312.13307).

Budget B_i = progressive_budgets(F, N, k, direction)[i], F = MACs of the unified model. A proxy search
(`stepwise.pruning.proxy_search`: propose -> prune to B_i -> short fine-tune proxy on [lo, hi) -> memory bank) picks a
per-group pruning decision, with Taylor / Diff-Pruning (arXiv 2305.10924) gradients restricted to [lo, hi). The best
candidate is rebuilt, fine-tuned on [lo, hi) with `stepwise.training.train` (sampler restricted to the range) and
saved with its measured MACs and parameters. An expert whose budget is the full model (rank N) is kept as it is
(copied: neither searched nor fine-tuned).

Resumable: the memory bank (`bank.json`, with its identity in `search.json`) and the fine-tune checkpoints are
persistent DVC outputs; a rerun after a kill redoes no finished round and resumes the fine-tune. A bank written by a
different search (other settings, expert or data) is discarded.

Storage of a pruned model (see `load_pruned`): a `save_model` file whose `model` config is the *unpruned*
architecture and whose `meta["pruning"]` holds the per-group ratios; loading rebuilds the unpruned model, re-applies
`prune_to_ratios` (the kept channel counts depend only on the ratios) and loads the state dict strictly, so the
file stays plain tensors + JSON-like meta and loads with weights_only=True.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stepwise.checkpoint import fingerprint, load_denoiser, load_model_file, save_model
from stepwise.config import parse
from stepwise.data import load_split, sha256, to_model_range
from stepwise.diffusion import Diffusion
from stepwise.errors import CheckpointError, ConfigError, StepwiseError
from stepwise.grouping import groups_from_dict
from stepwise.io import FORMAT_KEY, atomic_path, write_json, write_text
from stepwise.models import build_model, count_params
from stepwise.prune_config import PruneConfig
from stepwise.pruning import (
    IMPORTANCES,
    GradientBatch,
    candidate_model,
    count_macs,
    example_inputs,
    make_scorer,
    progressive_budgets,
    proxy_search,
    prunable_groups,
    prune_to_ratios,
    short_finetune_loss,
)
from stepwise.pruning.proposers import ranked
from stepwise.pruning.search import BANK_FORMAT
from stepwise.seeding import derive_seed
from stepwise.tdc_config import num_groups
from stepwise.training import build_sampler, train

from .common import add_paths, load_params, report_metrics, run_stage, section, stage_run
from .finetune import RangeRecorder, run_seed
from .pretrain import RESUME_NEUTRAL

log = logging.getLogger("stepwise.prune")
PRUNED_FORMAT = "stepwise-pruned/1"  # meta["pruning"]["format"] of a pruned model file
SEARCH_FORMAT = "stepwise-prune-search/1"  # search.json: the identity of the bank beside it


def load_groups(path, K: int, T: int) -> list[tuple[int, int]]:
    """The K [lo, hi) groups of groups.json; ConfigError if missing or written for another K / T."""
    if not Path(path).is_file():
        raise ConfigError(f"{path}: not found; run `dvc repro cluster`")
    record = json.loads(Path(path).read_text())
    groups = groups_from_dict(record)
    if len(groups) != K or int(record["T"]) != T:
        raise ConfigError(f"{path} holds {len(groups)} groups of T={record['T']} but tdc.num_groups={K}, T={T}: "
                          "rerun `dvc repro cluster`")
    return groups


def load_pruned(path, use_ema: bool = True):
    """(model in eval mode, Diffusion, image_shape, meta) from a model file, pruned (meta['pruning']) or not.

    A pruned file is rebuilt as: unpruned model from its config -> prune_to_ratios(ratios) -> strict state dict load.
    """
    obj = load_model_file(path)
    spec = obj["meta"].get("pruning")
    if spec is None:
        model, diffusion, shape = load_denoiser(path, use_ema=use_ema)
        return model, diffusion, shape, obj["meta"]
    if spec.get("format") != PRUNED_FORMAT:
        raise CheckpointError(f"{path}: pruning record has format {spec.get('format')!r}, expected {PRUNED_FORMAT!r}")
    c, h, w = obj["image_shape"]
    diffusion = Diffusion.from_config(obj["diffusion"])
    base = build_model(obj["model"], image_size=h, channels=c, out_channels=c * diffusion.out_channels_factor)
    try:
        model = prune_to_ratios(base, dict(spec["ratios"]), example_inputs(c, h), "magnitude",
                                ignored=tuple(spec["ignored"]))
        model.load_state_dict(obj["ema_state_dict" if use_ema else "state_dict"])
        diffusion.load_state_dict(obj.get("diffusion_state") or {})
    except (ConfigError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the pruned weights do not fit the model rebuilt from its config and pruning "
                              f"ratios ({str(e).splitlines()[0]}); rerun `dvc repro prune`") from None
    return model.eval(), diffusion.eval(), (c, h, w), obj["meta"]


def read_json_or_none(path) -> dict | None:
    """A JSON file's content, or None if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def prepare_bank(bank_path: Path, identity_path: Path, identity: dict) -> int:
    """Keep the persistent bank only if search.json says it belongs to this search (else delete it); its rounds."""
    old = read_json_or_none(identity_path)
    if old is None or old.get("fingerprint") != identity["fingerprint"]:
        if bank_path.exists():
            log.warning("%s was written by a different search (settings, expert or data changed): starting afresh",
                        bank_path)
            bank_path.unlink()
        write_json(identity, identity_path)
    bank = read_json_or_none(bank_path) if bank_path.exists() else None
    return len(bank.get("rounds", [])) if isinstance(bank, dict) else 0


class ProgressProxy:
    """Wraps the proxy: advances a progress bar by one round per scored candidate."""

    def __init__(self, proxy, bar):
        self.proxy, self.bar = proxy, bar

    def __call__(self, model) -> float:
        score = self.proxy(model)
        self.bar.update(1)
        self.bar.set_postfix(score=f"{score:.4g}")
        return score


def search_curve_csv(rounds: list[dict], full_macs: float) -> str:
    """round, proposer, score, best_score (so far), macs, macs_fraction, params; empty score = non-finite."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["round", "proposer", "score", "best_score", "macs", "macs_fraction", "params"])
    best = math.inf
    for e in rounds:
        if e["score"] is not None:
            best = min(best, e["score"])
        w.writerow([e["round"], e["proposer"], "" if e["score"] is None else e["score"],
                    "" if math.isinf(best) else best, e["macs"], e["macs"] / full_macs, e["params"]])
    return out.getvalue()


def plot_search(rounds: list[dict], budget: float, full_macs: float, title: str, path) -> None:
    """Proxy score per round and best so far (left), candidate MACs / F against the budget (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    rs = [e["round"] for e in rounds]
    scores = [math.nan if e["score"] is None else e["score"] for e in rounds]
    best, running = [], math.inf
    for s in scores:
        running = min(running, s) if math.isfinite(s) else running
        best.append(running if math.isfinite(running) else math.nan)
    ax.plot(rs, scores, "o", label="candidate")
    ax.plot(rs, best, "-", color="k", label="best so far")
    ax.set_xlabel("round")
    ax.set_ylabel("proxy score (lower is better)")
    ax.legend()
    ax2.bar(rs, [e["macs"] / full_macs for e in rounds], color="tab:grey")
    ax2.axhline(budget / full_macs, color="tab:red", label="budget")
    ax2.set_xlabel("round")
    ax2.set_ylabel("MACs / full model")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)



def resume_relevant(tcfg) -> dict:
    """The TrainConfig settings a resumed fine-tune must share with its checkpoints (cf. stages.pretrain)."""
    neutral = set(RESUME_NEUTRAL)
    if tcfg.momentum_decay != "none" and "total_steps" not in tcfg.momentum_decay_args:
        neutral.discard("steps")  # the momentum schedule spans train.steps: more steps is another run
    return {k: v for k, v in asdict(tcfg).items() if k not in neutral}


def finetune(candidate, diffusion, images, tcfg, t_range, ckpt_dir, stage: str, run, run_id: str) -> dict:
    """Fine-tune the pruned candidate on t in [lo, hi) only (resumable); state dicts on the CPU and the t record."""
    lo, hi = t_range
    sampler = RangeRecorder(build_sampler(tcfg, diffusion, t_range=(lo, hi)), lo, hi)
    result = train(candidate, diffusion, images, tcfg, ckpt_dir, fingerprint=run_id, sampler=sampler,
                   log_fn=run.log_metrics)
    seen = sampler.seen()
    if seen["t_draws"] and not (lo <= seen["t_min"] and seen["t_max"] < hi):
        raise StepwiseError(f"{stage}: fine-tuned on t in [{seen['t_min']}, {seen['t_max']}] outside [{lo}, {hi})")
    last = result["history"][-max(1, len(result["history"]) // 10):]
    return {"state_dict": result["model"].cpu().state_dict(), "ema_state_dict": result["ema"].cpu().state_dict(),
            "fingerprint": run_id, "steps": tcfg.steps, "images_seen": result["images_seen"],
            "resumed_from": result["resumed_from"] or 0, "seen": seen,
            "final_loss": sum(r["loss"] for r in last) / len(last)}


def main(args) -> None:
    params = load_params(args.params)
    tdc = section(params, "tdc")
    pcfg = parse(PruneConfig, section(params, "tdc", "prune"), "tdc.prune")
    unified_obj = load_model_file(args.unified)
    T = int(unified_obj["diffusion"]["T"])
    K = num_groups(tdc, T)
    group = args.group
    if not 0 <= group < K:
        raise ConfigError(f"--group {group} is not a group index: tdc.num_groups={K}")
    lo, hi = load_groups(args.groups, K, T)[group]
    expert_path = Path(args.experts) / str(group) / "model.pt"
    expert_obj = load_model_file(expert_path)
    emeta = expert_obj["meta"]
    unified_sha, expert_sha = sha256(args.unified), sha256(expert_path)
    if (emeta.get("lo"), emeta.get("hi")) != (lo, hi) or emeta.get("unified_sha256") != unified_sha:
        raise ConfigError(f"{expert_path} was fine-tuned on [{emeta.get('lo')}, {emeta.get('hi')}) from another "
                          f"unified model or range than group {group} = [{lo}, {hi}) of {args.groups}: rerun "
                          f"`dvc repro finetune@{group}`")
    tcfg = pcfg.train_config(section(params, "train"), seed=run_seed(pcfg.seed, group))
    images, _, _ = load_split(f"{args.data}/train.pt")
    for key in ("proxy_images", "grad_images"):
        if getattr(pcfg, key) > len(images):
            raise ConfigError(f"tdc.prune.{key}={getattr(pcfg, key)} exceeds the {len(images)} training images")
    if tcfg.batch_size > len(images):
        raise ConfigError(f"tdc.prune.train batch_size={tcfg.batch_size} exceeds the {len(images)} training images")
    data_sha = json.loads(Path(args.data, "card.json").read_text())["splits"]["train"]["sha256"]

    unified, _, shape = load_denoiser(args.unified, use_ema=True)
    expert, diffusion, eshape = load_denoiser(expert_path, use_ema=pcfg.init == "ema")
    if tuple(eshape) != tuple(shape) or tuple(images.shape[1:]) != tuple(shape):
        raise ConfigError(f"image shapes differ: unified {list(shape)}, expert {list(eshape)}, data "
                          f"{list(images.shape[1:])}; rerun the upstream stages")
    inputs = example_inputs(shape[0], shape[1])
    full_macs = count_macs(unified, inputs)
    budget = progressive_budgets(full_macs, K, pcfg.k, pcfg.direction)[group]
    groups = prunable_groups(expert, inputs, tuple(pcfg.ignored))  # ConfigError for unknown `ignored` names
    searched = budget < full_macs * (1 - pcfg.tol)

    gen = torch.Generator().manual_seed(derive_seed(pcfg.seed, group, 17))
    perm = torch.randperm(len(images), generator=gen)  # (N,)
    proxy_x = to_model_range(images[perm[: pcfg.proxy_images]])  # (P, C, H, W)
    grad_x = to_model_range(images[perm[: pcfg.grad_images]])  # (G, C, H, W)
    batch = (GradientBatch(diffusion, grad_x, torch.randn(grad_x.shape, generator=gen), (lo, hi), pcfg.t_stride,
                           pcfg.thr) if IMPORTANCES[pcfg.importance][1] is not None else None)
    proxy = functools.partial(short_finetune_loss, diffusion=diffusion, images=proxy_x, t_range=(lo, hi),
                              steps=pcfg.proxy_steps, lr=pcfg.proxy_lr, batch_size=pcfg.proxy_batch_size,
                              eval_points=pcfg.proxy_eval_points, seed=pcfg.seed)
    identity = {FORMAT_KEY: SEARCH_FORMAT, "group": group, "lo": lo, "hi": hi, "budget": budget,
                "full_macs": full_macs, "expert_sha256": expert_sha, "data_sha256": data_sha,
                "settings": pcfg.search_settings()}
    identity["fingerprint"] = fingerprint(identity)
    out = Path(args.out)
    bank_path, identity_path = out / "bank.json", out / "search.json"
    stage = f"prune@{group}"
    stage_params = {"tdc": {"prune": asdict(pcfg), "num_groups": K}, "train_effective": asdict(tcfg),
                    "group": {"index": group, "lo": lo, "hi": hi},
                    "budget": {"macs": budget, "full_macs": full_macs, "fraction": budget / full_macs}}
    with stage_run(stage, params, stage_params) as run:
        run.set_tags({"tdc.group": str(group), "tdc.t_range": f"[{lo}, {hi})", "tdc.role": "pruned_expert",
                      "prune.search_fingerprint": identity["fingerprint"]})
        resumed = prepare_bank(bank_path, identity_path, identity)
        t0 = time.time()
        if searched:
            todo = max(pcfg.rounds - resumed, 0)
            log.info("%s: budget %.4g MACs (%.3f F) on [%d, %d); %d of %d rounds in the bank, %d to run", stage,
                     budget, budget / full_macs, lo, hi, min(resumed, pcfg.rounds), pcfg.rounds, todo)
            with tqdm(total=pcfg.rounds, initial=min(resumed, pcfg.rounds), desc=f"{stage} search") as bar:
                bank = proxy_search(expert, budget, inputs, ProgressProxy(proxy, bar), bank_path, rounds=pcfg.rounds,
                                    proposer=pcfg.proposer, importance=pcfg.importance, batch=batch, seed=pcfg.seed,
                                    tol=pcfg.tol, max_ratio=pcfg.max_ratio, ignored=tuple(pcfg.ignored))
            rounds = bank.rounds[: pcfg.rounds]  # a bank extended by a longer search may hold more
            best = next(iter(ranked(rounds)), None)
            if best is None:
                raise StepwiseError(f"{stage}: every candidate's proxy score is non-finite; lower tdc.prune.proxy_lr "
                                    f"or delete {bank_path} after fixing the cause")
            scorer = make_scorer(expert, pcfg.importance, batch)
            candidate = candidate_model(expert, best, inputs, scorer, seed=pcfg.seed, ignored=tuple(pcfg.ignored))
            ratios, kept, importance_ts = best["ratios"], best["kept"], scorer.timesteps
        else:  # rank N: the budget is the full model; it is the expert itself, neither searched nor fine-tuned
            log.info("%s: budget %.4g MACs is the full model (%.4g): no search, no fine-tune, the expert is kept",
                     stage, budget, full_macs)
            write_json({FORMAT_KEY: BANK_FORMAT, "meta": {"budget": budget, "full_macs": full_macs,
                                                          "skipped": "budget >= full model MACs * (1 - tol)"},
                        "rounds": []}, bank_path)
            rounds, best, candidate = [], None, expert
            ratios, kept, importance_ts = {}, {g.name: g.units for g in groups}, []
        search_seconds = time.time() - t0
        macs = count_macs(candidate, inputs)
        if best is not None and abs(macs - best["macs"]) > 0.5:
            raise StepwiseError(f"{stage}: the rebuilt best candidate has {macs:.6g} MACs, the bank recorded "
                                f"{best['macs']:.6g}; delete {bank_path} and rerun")
        if macs > budget * (1 + pcfg.tol):
            raise StepwiseError(f"{stage}: candidate MACs {macs:.4g} exceed the budget {budget:.4g} (1 + tol)")
        best_so_far = math.inf
        for e in rounds:
            if e["score"] is not None:
                best_so_far = min(best_so_far, e["score"])
                run.log_metrics({"search_score": e["score"], "search_best_score": best_so_far}, step=e["round"])
            run.log_metrics({"search_macs_fraction": e["macs"] / full_macs}, step=e["round"])
        write_text(search_curve_csv(rounds, full_macs), args.curve)
        plot_search(rounds, budget, full_macs, f"{stage}: t in [{lo}, {hi}), budget {budget / full_macs:.3f} F",
                    args.curve_png)

        t1 = time.time()
        if searched:
            tuned = finetune(candidate, diffusion, images, tcfg, (lo, hi), out / "checkpoints", stage, run,
                             fingerprint(identity["fingerprint"], ratios, pcfg.init, resume_relevant(tcfg)))
        else:
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)  # the (persistent) DVC output stays empty
            tuned = {"state_dict": expert_obj["state_dict"], "ema_state_dict": expert_obj["ema_state_dict"],
                     "fingerprint": emeta.get("fingerprint"), "steps": 0, "images_seen": 0, "resumed_from": 0,
                     "seen": {}, "final_loss": None}
        finetune_seconds = time.time() - t1
        num_params, full_params = count_params(candidate), count_params(unified)
        meta = {"group": group, "lo": lo, "hi": hi, "budget_macs": budget, "full_macs": full_macs,
                "macs_per_forward": macs, "num_params": num_params, "full_params": full_params,
                "expert_sha256": expert_sha, "unified_sha256": unified_sha, "data_sha256": data_sha,
                "search_fingerprint": identity["fingerprint"], "fingerprint": tuned["fingerprint"],
                "searched": searched, "best_round": -1 if best is None else best["round"], "rounds": len(rounds),
                "init": pcfg.init, "steps": tuned["steps"], "images_seen": tuned["images_seen"], **tuned["seen"],
                "pruning": {"format": PRUNED_FORMAT, "ratios": dict(ratios), "kept": dict(kept),
                            "ignored": list(pcfg.ignored), "importance": pcfg.importance}}
        save_model(out / "model.pt", model_cfg=expert_obj["model"], diffusion_cfg=expert_obj["diffusion"],
                   image_shape=shape, state_dict=tuned["state_dict"], ema_state_dict=tuned["ema_state_dict"],
                   diffusion_state=diffusion.state_dict(), meta=meta)
        reloaded, _, _, _ = load_pruned(out / "model.pt", use_ema=True)  # the file must rebuild to the same model
        if count_macs(reloaded, inputs) != macs:
            raise StepwiseError(f"{out / 'model.pt'}: reloaded model's MACs differ from the saved model's")
        metrics = {"group": group, "lo": lo, "hi": hi, "budget_macs": budget, "full_macs": full_macs, "macs": macs,
                   "budget_fraction": budget / full_macs, "macs_fraction": macs / full_macs,
                   "budget_gap": macs / budget - 1, "tol": pcfg.tol, "params": num_params, "full_params": full_params,
                   "params_fraction": num_params / full_params, "searched": float(searched),
                   "rounds": len(rounds), "rounds_resumed": min(resumed, len(rounds)),
                   "rounds_run_this_run": len(rounds) - min(resumed, len(rounds)),
                   "best_round": -1 if best is None else best["round"],
                   "importance_timesteps": len(importance_ts), "pruned_groups": sum(
                       1 for g in groups if kept.get(g.name, g.units) < g.units), "channel_groups": len(groups),
                   "search_seconds_this_run": search_seconds, "finetune_seconds_this_run": finetune_seconds,
                   "steps": tuned["steps"], "images_seen": tuned["images_seen"],
                   "resumed_from_step": tuned["resumed_from"], **tuned["seen"]}
        if tuned["final_loss"] is not None:
            metrics["final_loss"] = tuned["final_loss"]
        if best is not None:
            metrics["best_score"] = best["score"]
        report_metrics(run, metrics, args.metrics, log, exclude=("group", "lo", "hi"))
        for path in (bank_path, args.curve, args.curve_png, out / "model.pt"):
            run.log_artifact(path)
        log.info("%s: %.4g MACs (%.3f F, budget %.3f F), %d params (%.3f), best round %s of %d", stage, macs,
                 macs / full_macs, budget / full_macs, num_params, num_params / full_params, metrics["best_round"],
                 len(rounds))


def configure(parser) -> None:
    parser.add_argument("--group", type=int, required=True, help="prune the expert of this group index")
    add_paths(parser, "data", "unified", "experts", "groups", metrics=None)
    parser.add_argument("--out", required=True, help="e.g. models/pruned/0 (model.pt, bank.json, search.json, "
                                                     "checkpoints/)")
    parser.add_argument("--curve", required=True, help="search curve CSV, e.g. plots/prune_search/0.csv")
    parser.add_argument("--curve-png", required=True, help="search curve plot, e.g. plots/prune_search/0.png")


if __name__ == "__main__":
    run_stage("prune", main, configure)
