"""A trained denoiser as an MLflow model ("models from code": this file is the model's code, nothing is pickled).

`stepwise.tracking.Tracker.log_denoiser` logs a model file (`stepwise.artifacts.save_model`, pruned or not) with
this code; `mlflow.pyfunc.load_model(uri).predict({"num": 16, "steps": 25, "seed": 0})` returns uint8 samples
(num, C, H, W) as a numpy array. The weights are read with torch's weights_only loader either way; to get the torch
module itself without running any logged code, use `load_logged_denoiser(uri)` below.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class Denoiser(PythonModel):
    """Samples from a logged stepwise model file with DDIM and fixed, seeded noise."""

    def load_context(self, context):
        from stepwise.pruning.model_file import load_pruned

        self.model, self.diffusion, self.shape, self.meta = load_pruned(context.artifacts["model_file"])

    def predict(self, context, model_input, params=None):
        from stepwise.sampling import generate, to_uint8

        spec = dict(model_input or {})
        images = generate(self.model, self.diffusion, int(spec.get("num", 16)), self.shape,
                          sampler=spec.get("sampler", "ddim"), steps=int(spec.get("steps", 25)),
                          seed=int(spec.get("seed", 0)), progress=False)
        return to_uint8(images).numpy()


def load_logged_denoiser(uri: str, use_ema: bool = True):
    """(model, Diffusion, image_shape, meta) of a denoiser logged with `Tracker.log_denoiser`, e.g.
    `load_logged_denoiser("models:/m-0123...")` or `("runs:/<run id>/unified")`: downloads its model file and
    loads it with torch's weights_only loader; no logged code is run."""
    from .errors import StepwiseError
    from .pruning.model_file import load_pruned
    from .tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    local = Path(mlflow.artifacts.download_artifacts(uri))
    files = sorted(local.rglob("model.pt")) if local.is_dir() else [local]
    if not files:
        raise StepwiseError(f"{uri}: holds no model.pt; was it logged with Tracker.log_denoiser?")
    return load_pruned(files[0], use_ema=use_ema)


mlflow.models.set_model(Denoiser())
