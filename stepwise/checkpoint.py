"""Training checkpoints: numbered, atomically written, checked on load, resumed only when the run is the same run.

(The final model file of a run is a pipeline artifact: `stepwise.artifacts.save_model`.)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from .errors import CheckpointError
from .io import load_torch, save_torch

CKPT_FORMAT = "stepwise-ckpt/1"
# the entries a resumed run reads (`stepwise.training.train`), and their types (`stepwise.io.field_problem`)
CKPT_FIELDS = {"step": int, "fingerprint": str, "model": dict, "ema": dict, "optimizer": dict, "sampler": list,
               "diffusion": dict, "history": list, "momentum": (dict, type(None))}
# TrainConfig settings that may change between a run and its resumption without making it a different run.
RESUME_NEUTRAL = ("steps", "ckpt_every", "keep_checkpoints", "log_every", "device")  # nproc is not: per-rank RNG


def fingerprint(*parts) -> str:
    """Stable hash of JSON-serialisable run settings: a checkpoint is resumed only if its fingerprint matches."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_relevant(tcfg) -> dict:
    """The TrainConfig settings a resumed run must share with its checkpoints (its part of the run fingerprint): all
    but RESUME_NEUTRAL, and `steps` too when a momentum-decay schedule spans train.steps (more steps: another run)."""
    neutral = set(RESUME_NEUTRAL)
    if tcfg.momentum_decay != "none" and "total_steps" not in tcfg.momentum_decay_args:
        neutral.discard("steps")
    return {k: v for k, v in asdict(tcfg).items() if k not in neutral}


def checkpoint_paths(ckpt_dir) -> list[Path]:
    """Checkpoints in ckpt_dir, oldest first."""
    return sorted(Path(ckpt_dir).glob("step_*.pt"))


def checkpoint_step(path: Path) -> int:
    """The training step of a checkpoint file named step_XXXXXXXX.pt."""
    return int(Path(path).stem.split("_")[1])


def save_checkpoint(state: dict, ckpt_dir, step: int, keep: int = 2, protect=()) -> Path:
    """Write ckpt_dir/step_{step:08d}.pt atomically, then delete all but the newest `keep` and the `protect` steps."""
    path = Path(ckpt_dir) / f"step_{step:08d}.pt"
    save_torch({"format": CKPT_FORMAT, "step": step, **state}, path)
    for old in checkpoint_paths(ckpt_dir)[:-keep]:
        if checkpoint_step(old) not in protect:
            old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(ckpt_dir, expected_fingerprint: str) -> dict | None:
    """The newest checkpoint if it belongs to this run (same fingerprint), None if there is none or it is another run's.

    A corrupt newest checkpoint raises CheckpointError naming it and the previous good one.
    """
    paths = checkpoint_paths(ckpt_dir)
    if not paths:
        return None
    newest = paths[-1]
    try:
        state = load_torch(newest, CKPT_FORMAT, fields=CKPT_FIELDS)
    except CheckpointError as e:
        previous = [p for p in paths[:-1]]
        offer = (f"the previous checkpoint is {previous[-1]}: delete {newest} to resume from it"
                 if previous else f"no earlier checkpoint exists: delete {newest} to start training afresh")
        raise CheckpointError(f"{e} Refusing to use it; {offer}.") from None
    if state.get("fingerprint") != expected_fingerprint:
        return None
    return state


def load_checkpoint_ema(path, model, diffusion) -> int:
    """Load a training checkpoint's EMA weights (and diffusion state) into model/diffusion; returns its step."""
    state = load_torch(path, CKPT_FORMAT, fields={"step": int, "ema": dict, "diffusion": dict})
    try:
        model.load_state_dict(state["ema"])
        diffusion.load_state_dict(state.get("diffusion") or {})
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model of the final model file ({str(e).splitlines()[0]})") from None
    return int(state["step"])
