"""Pruning one TDC expert to its progressive MACs budget (arXiv 2312.13307), and the pruned model file.

Budget B_i = progressive_budgets(F, N, k, direction)[i], F = MACs of the unified model. A proxy search
(`proxy_search`: propose -> prune to B_i -> short fine-tune proxy on [lo, hi) -> memory bank) picks a per-group
pruning decision, with Taylor / Diff-Pruning (arXiv 2305.10924) gradients restricted to [lo, hi). The best candidate
is rebuilt, fine-tuned on [lo, hi) (sampler restricted to the range) and saved with its measured MACs and
parameters. An expert whose budget is the full model (rank N) is kept as it is: neither searched nor fine-tuned.

Resumable: the memory bank (`bank.json`, its identity in `search.json`) and the fine-tune checkpoints persist; a
rerun redoes no finished round and resumes the fine-tune. A bank written by a different search (other settings,
expert or data) is discarded.

The pruned model file is `stepwise.pruning.model_file`.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..artifacts import load_model_file, save_model, train_sha
from ..checkpoint import fingerprint, resume_relevant
from ..config import TrainConfig
from ..data import load_split, sha256, to_model_range
from ..errors import ConfigError, StepwiseError
from ..flops import count_macs, example_inputs
from ..io import FORMAT_KEY, read_json, write_json
from ..models import count_params
from ..seeding import derive_seed
from ..tdc import check_expert, range_sampler, train_on_range
from .budgets import progressive_budgets
from .importance import IMPORTANCES, GradientBatch, make_scorer
from .proposers import ranked
from .proxy import short_finetune_loss
from ..progress import progress
from .model_file import load_pruned, pruning_record
from .search import BANK_FORMAT, candidate_model, proxy_search
from .structural import prunable_groups

log = logging.getLogger(__name__)
SEARCH_FORMAT = "stepwise-prune-search/1"  # search.json: the identity of the bank beside it


# ---- the memory bank's identity -----------------------------------------------------------------------------------


def read_json_or_none(path) -> dict | None:
    """A JSON file's content, or None if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError
        return None


def prepare_bank(bank_path: Path, identity_path: Path, identity: dict) -> int:
    """Keep the persistent bank only if search.json says it belongs to this search (else delete it); the number of
    rounds it holds (a corrupt bank counts 0: `MemoryBank.open` reports it). DataError if search.json is corrupt."""
    old = None
    if identity_path.exists():
        old = read_json(identity_path, "dvc repro prune", fields={"fingerprint": str},
                        fix=f"delete it and {bank_path.name} beside it to start the search over")
    if old is None or old["fingerprint"] != identity["fingerprint"]:
        if bank_path.exists():
            log.warning("%s was written by a different search (settings, expert or data changed): starting afresh",
                        bank_path)
            bank_path.unlink()
        write_json(identity, identity_path)
    bank = read_json_or_none(bank_path) if bank_path.exists() else None
    rounds = bank.get("rounds") if isinstance(bank, dict) else None
    return len(rounds) if isinstance(rounds, list) else 0


class ProgressProxy:
    """Wraps the proxy: advances a progress bar by one round per scored candidate."""

    def __init__(self, proxy, bar):
        self.proxy, self.bar = proxy, bar

    def __call__(self, model) -> float:
        score = self.proxy(model)
        self.bar.update(1)
        self.bar.set_postfix(score=f"{score:.4g}")
        return score


# ---- the procedure ------------------------------------------------------------------------------------------------


@dataclass
class PruneJob:
    """Everything pruning expert `group` needs, loaded and checked before any search or training."""

    group: int
    t_range: tuple[int, int]
    pcfg: object  # PruneConfig
    cfg: TrainConfig  # of the post-pruning fine-tune
    expert_file: dict
    expert: nn.Module
    diffusion: nn.Module
    images: torch.Tensor
    inputs: tuple
    full_macs: int
    full_params: int
    budget: float
    channel_groups: list
    batch: GradientBatch | None  # importance gradients on [lo, hi), None for gradient-free importances
    proxy: object  # candidate -> proxy score (lower is better)
    identity: dict  # search.json: what the bank belongs to
    hashes: dict  # expert_sha256, unified_sha256, data_sha256

    @property
    def searched(self) -> bool:
        """False for the rank-N expert, whose budget is the full model: it is kept as it is."""
        return self.budget < self.full_macs * (1 - self.pcfg.tol)


def prune_job(pcfg, cfg: TrainConfig, group: int, t_range: tuple[int, int], K: int, unified_path, expert_path,
              data_dir) -> PruneJob:
    """Load the unified model, expert `group` (checked against its range and the unified model) and the data; fix the
    budget, the seeded proxy/gradient images and the search identity."""
    lo, hi = t_range
    expert_obj = load_model_file(expert_path)
    hashes = {"expert_sha256": sha256(expert_path), "unified_sha256": sha256(unified_path),
              "data_sha256": train_sha(data_dir)}
    check_expert(expert_path, expert_obj["meta"], group, t_range, hashes["unified_sha256"])
    images, _, _ = load_split(f"{data_dir}/train.pt")
    for key in ("proxy_images", "grad_images"):
        if getattr(pcfg, key) > len(images):
            raise ConfigError(f"tdc.prune.{key}={getattr(pcfg, key)} exceeds the {len(images)} training images")
    if cfg.batch_size > len(images):
        raise ConfigError(f"tdc.prune.train batch_size={cfg.batch_size} exceeds the {len(images)} training images")
    unified, _, shape, _ = load_pruned(unified_path, use_ema=True)
    expert, diffusion, eshape, _ = load_pruned(expert_path, use_ema=pcfg.init == "ema")
    if tuple(eshape) != tuple(shape) or tuple(images.shape[1:]) != tuple(shape):
        raise ConfigError(f"image shapes differ: unified {list(shape)}, expert {list(eshape)}, data "
                          f"{list(images.shape[1:])}; rerun the upstream stages")
    inputs = example_inputs(shape[0], shape[1])
    full_macs = count_macs(unified, inputs)
    budget = progressive_budgets(full_macs, K, pcfg.k, pcfg.direction)[group]
    channel_groups = prunable_groups(expert, inputs, tuple(pcfg.ignored))  # ConfigError for unknown `ignored`
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
                "full_macs": full_macs, "expert_sha256": hashes["expert_sha256"], "data_sha256": hashes["data_sha256"],
                "settings": pcfg.search_settings()}
    identity["fingerprint"] = fingerprint(identity)
    return PruneJob(group, (lo, hi), pcfg, cfg, expert_obj, expert, diffusion, images, inputs, full_macs,
                    count_params(unified), budget, channel_groups, batch, proxy, identity, hashes)


def search(job: PruneJob, out: Path, who: str) -> dict:
    """Run (or resume) the proxy search and rebuild its best candidate; the full-budget expert is not searched.

    {'rounds', 'best' (bank entry or None), 'candidate', 'ratios', 'kept', 'importance_timesteps', 'resumed'}.
    """
    pcfg, bank_path = job.pcfg, out / "bank.json"
    resumed = prepare_bank(bank_path, out / "search.json", job.identity)
    if not job.searched:
        log.info("%s: budget %.4g MACs is the full model (%.4g): no search, no fine-tune, the expert is kept", who,
                 job.budget, job.full_macs)
        write_json({FORMAT_KEY: BANK_FORMAT, "rounds": [], "meta": {
            "budget": job.budget, "full_macs": job.full_macs, "skipped": "budget >= full model MACs * (1 - tol)"}},
            bank_path)
        return {"rounds": [], "best": None, "candidate": job.expert, "ratios": {}, "resumed": resumed,
                "kept": {g.name: g.units for g in job.channel_groups}, "importance_timesteps": []}
    log.info("%s: budget %.4g MACs (%.3f F) on [%d, %d); %d of %d rounds in the bank, %d to run", who, job.budget,
             job.budget / job.full_macs, *job.t_range, min(resumed, pcfg.rounds), pcfg.rounds,
             max(pcfg.rounds - resumed, 0))
    with progress(total=pcfg.rounds, initial=min(resumed, pcfg.rounds), desc=f"{who} search") as bar:
        bank = proxy_search(job.expert, job.budget, job.inputs, ProgressProxy(job.proxy, bar), bank_path,
                            rounds=pcfg.rounds, proposer=pcfg.proposer, importance=pcfg.importance, batch=job.batch,
                            seed=pcfg.seed, tol=pcfg.tol, max_ratio=pcfg.max_ratio, ignored=tuple(pcfg.ignored))
    rounds = bank.rounds[: pcfg.rounds]  # a bank extended by a longer search may hold more
    best = next(iter(ranked(rounds)), None)
    if best is None:
        raise StepwiseError(f"{who}: every candidate's proxy score is non-finite; lower tdc.prune.proxy_lr or delete "
                            f"{bank_path} after fixing the cause")
    scorer = make_scorer(job.expert, pcfg.importance, job.batch)
    candidate = candidate_model(job.expert, best, job.inputs, scorer, seed=pcfg.seed, ignored=tuple(pcfg.ignored))
    return {"rounds": rounds, "best": best, "candidate": candidate, "ratios": best["ratios"], "kept": best["kept"],
            "importance_timesteps": scorer.timesteps, "resumed": resumed}


def finetune_pruned(job: PruneJob, found: dict, out: Path, who: str, log_fn=None) -> dict:
    """Fine-tune the searched candidate on [lo, hi) (resumable from out/checkpoints); the full-budget expert keeps
    its file's weights. State dicts on the CPU, the t record, steps, images and final loss."""
    if not job.searched:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)  # the (persistent) DVC output stays empty
        return {"state_dict": job.expert_file["state_dict"], "ema_state_dict": job.expert_file["ema_state_dict"],
                "fingerprint": job.expert_file["meta"].get("fingerprint"), "steps": 0, "images_seen": 0,
                "resumed_from": 0, "seen": {}, "final_loss": None}
    run_id = fingerprint(job.identity["fingerprint"], found["ratios"], job.pcfg.init, resume_relevant(job.cfg))
    sampler = range_sampler(job.cfg, job.diffusion, job.t_range)
    result = train_on_range(found["candidate"], job.diffusion, job.images, job.cfg, sampler, out / "checkpoints",
                            run_id, who, log_fn)
    return {"state_dict": result["model"].cpu().state_dict(), "ema_state_dict": result["ema"].cpu().state_dict(),
            "fingerprint": run_id, "steps": job.cfg.steps, "images_seen": result["images_seen"],
            "resumed_from": result["resumed_from"] or 0, "seen": result["seen"], "final_loss": result["final_loss"]}


def prune_expert(job: PruneJob, out_dir, who: str, log_fn=None) -> tuple[dict, list[dict]]:
    """Search, verify the best candidate's MACs (bank record, budget), fine-tune, save out_dir/model.pt and check
    that it reloads to the same MACs; (metrics, search rounds). Logs the search per round through log_fn."""
    out, pcfg, (lo, hi) = Path(out_dir), job.pcfg, job.t_range
    t0 = time.time()
    found = search(job, out, who)
    search_seconds = time.time() - t0
    rounds, best, candidate = found["rounds"], found["best"], found["candidate"]
    macs = count_macs(candidate, job.inputs)
    if best is not None and abs(macs - best["macs"]) > 0.5:
        raise StepwiseError(f"{who}: the rebuilt best candidate has {macs:.6g} MACs, the bank recorded "
                            f"{best['macs']:.6g}; delete {out / 'bank.json'} and rerun")
    if macs > job.budget * (1 + pcfg.tol):
        raise StepwiseError(f"{who}: candidate MACs {macs:.4g} exceed the budget {job.budget:.4g} (1 + tol)")
    if log_fn:
        log_search(rounds, job.full_macs, log_fn)
    t1 = time.time()
    tuned = finetune_pruned(job, found, out, who, log_fn)
    finetune_seconds = time.time() - t1
    num_params, full = count_params(candidate), job.full_macs
    meta = {"group": job.group, "lo": lo, "hi": hi, "budget_macs": job.budget, "full_macs": full,
            "macs_per_forward": macs, "num_params": num_params, "full_params": job.full_params, **job.hashes,
            "search_fingerprint": job.identity["fingerprint"], "fingerprint": tuned["fingerprint"],
            "searched": job.searched, "best_round": -1 if best is None else best["round"], "rounds": len(rounds),
            "init": pcfg.init, "steps": tuned["steps"], "images_seen": tuned["images_seen"], **tuned["seen"],
            "pruning": pruning_record(found["ratios"], found["kept"], pcfg.ignored, pcfg.importance)}
    save_model(out / "model.pt", model_cfg=job.expert_file["model"], diffusion_cfg=job.expert_file["diffusion"],
               image_shape=job.expert_file["image_shape"], state_dict=tuned["state_dict"],
               ema_state_dict=tuned["ema_state_dict"], diffusion_state=job.diffusion.state_dict(), meta=meta)
    if count_macs(load_pruned(out / "model.pt")[0], job.inputs) != macs:  # the file must rebuild to the same model
        raise StepwiseError(f"{out / 'model.pt'}: reloaded model's MACs differ from the saved model's")
    resumed = min(found["resumed"], len(rounds))
    metrics = {"group": job.group, "lo": lo, "hi": hi, "budget_macs": job.budget, "full_macs": full, "macs": macs,
               "budget_fraction": job.budget / full, "macs_fraction": macs / full, "budget_gap": macs / job.budget - 1,
               "tol": pcfg.tol, "params": num_params, "full_params": job.full_params,
               "params_fraction": num_params / job.full_params, "searched": float(job.searched),
               "rounds": len(rounds), "rounds_resumed": resumed, "rounds_run_this_run": len(rounds) - resumed,
               "best_round": meta["best_round"], "importance_timesteps": len(found["importance_timesteps"]),
               "pruned_groups": sum(1 for g in job.channel_groups if found["kept"].get(g.name, g.units) < g.units),
               "channel_groups": len(job.channel_groups), "search_seconds_this_run": search_seconds,
               "finetune_seconds_this_run": finetune_seconds, "steps": tuned["steps"],
               "images_seen": tuned["images_seen"], "resumed_from_step": tuned["resumed_from"], **tuned["seen"]}
    if tuned["final_loss"] is not None:
        metrics["final_loss"] = tuned["final_loss"]
    if best is not None:
        metrics["best_score"] = best["score"]
    return metrics, rounds


def log_search(rounds: list[dict], full_macs: float, log_fn) -> None:
    """Log each round's proxy score, the best so far and its MACs fraction at step = round."""
    best = math.inf
    for e in rounds:
        if e["score"] is not None:
            best = min(best, e["score"])
            log_fn({"search_score": e["score"], "search_best_score": best}, step=e["round"])
        log_fn({"search_macs_fraction": e["macs"] / full_macs}, step=e["round"])


def search_curve(rounds: list[dict], full_macs: float) -> tuple[list[str], list[list]]:
    """(header, rows) of the search curve: round, proposer, score, best_score (so far), macs, macs_fraction, params;
    an empty score is a non-finite one."""
    rows, best = [], math.inf
    for e in rounds:
        if e["score"] is not None:
            best = min(best, e["score"])
        rows.append([e["round"], e["proposer"], e["score"], None if math.isinf(best) else best, e["macs"],
                     e["macs"] / full_macs, e["params"]])
    return ["round", "proposer", "score", "best_score", "macs", "macs_fraction", "params"], rows
