"""Training checkpoints: numbered, atomically written, checked on load, resumed only when the run is the same run."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import CheckpointError
from .io import load_torch, save_torch

CKPT_FORMAT = "stepwise-ckpt/1"
MODEL_FORMAT = "stepwise-model/1"


def fingerprint(*parts) -> str:
    """Stable hash of JSON-serialisable run settings: a checkpoint is resumed only if its fingerprint matches."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        state = load_torch(newest, CKPT_FORMAT)
    except CheckpointError as e:
        previous = [p for p in paths[:-1]]
        offer = (f"the previous checkpoint is {previous[-1]}: delete {newest} to resume from it"
                 if previous else f"no earlier checkpoint exists: delete {newest} to start training afresh")
        raise CheckpointError(f"{e} Refusing to use it; {offer}.") from None
    if state.get("fingerprint") != expected_fingerprint:
        return None
    return state


def save_model(path, *, model_cfg: dict, diffusion_cfg: dict, image_shape, state_dict, ema_state_dict, meta: dict,
               diffusion_state: dict | None = None):
    """Write the trained denoiser (raw and EMA weights, plus everything needed to rebuild it) atomically."""
    save_torch({"format": MODEL_FORMAT, "model": dict(model_cfg), "diffusion": dict(diffusion_cfg),
                "image_shape": list(image_shape), "state_dict": state_dict, "ema_state_dict": ema_state_dict,
                "diffusion_state": diffusion_state or {}, "meta": meta}, path)


def load_model_file(path) -> dict:
    """Read a file written by save_model (weights_only=True); CheckpointError if missing, corrupt or foreign."""
    return load_torch(path, MODEL_FORMAT, hint="Run `dvc repro pretrain` to rebuild it.")


def load_denoiser(path, use_ema: bool = True):
    """Rebuild (model in eval mode, Diffusion, image_shape) from a model file; CheckpointError if it does not fit."""
    from .diffusion import Diffusion
    from .models import build_model

    obj = load_model_file(path)
    c, h, w = obj["image_shape"]
    diffusion = Diffusion.from_config(obj["diffusion"])
    model = build_model(obj["model"], image_size=h, channels=c, out_channels=c * diffusion.out_channels_factor)
    try:
        model.load_state_dict(obj["ema_state_dict" if use_ema else "state_dict"])
        diffusion.load_state_dict(obj.get("diffusion_state") or {})
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model it describes ({str(e).splitlines()[0]})") from None
    return model.eval(), diffusion.eval(), (c, h, w)


def load_checkpoint_ema(path, model, diffusion) -> int:
    """Load a training checkpoint's EMA weights (and diffusion state) into model/diffusion; returns its step."""
    state = load_torch(path, CKPT_FORMAT)
    try:
        model.load_state_dict(state["ema"])
        diffusion.load_state_dict(state.get("diffusion") or {})
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model of the final model file ({str(e).splitlines()[0]})") from None
    return int(state["step"])
