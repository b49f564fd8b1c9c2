"""The pipeline's artifact files: one writer and one checked reader per format, each naming the stage that rebuilds
what it cannot read.

- model file (MODEL_FORMAT, `save_model` / `load_model`): a denoiser's config, raw and EMA weights, diffusion state
  and meta. A pruned expert is a model file of the *unpruned* config whose meta['pruning'] says how to rebuild the
  pruned architecture (`stepwise.pruning.expert`); `load_model` rebuilds either kind.
- samples file (SAMPLES_FORMAT): uint8 samples with the (sampler, steps, seed) they were drawn with.
- groups file (groups.json of `cluster`, `stepwise.grouping`'s record), the dataset card (card.json of `prepare`)
  and the stages' metrics JSON.
- CSV tables (plots, profiles): `write_table` / `read_table`.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError, DataError
from .io import load_torch, save_torch, write_text

MODEL_FORMAT = "stepwise-model/1"
SAMPLES_FORMAT = "stepwise-samples/1"


# ---- model file -----------------------------------------------------------------------------------------------


def save_model(path, *, model_cfg: dict, diffusion_cfg: dict, image_shape, state_dict, ema_state_dict, meta: dict,
               diffusion_state: dict | None = None):
    """Write the trained denoiser (raw and EMA weights, plus everything needed to rebuild it) atomically."""
    save_torch({"format": MODEL_FORMAT, "model": dict(model_cfg), "diffusion": dict(diffusion_cfg),
                "image_shape": list(image_shape), "state_dict": state_dict, "ema_state_dict": ema_state_dict,
                "diffusion_state": diffusion_state or {}, "meta": meta}, path)


def load_model_file(path) -> dict:
    """Read a file written by save_model (weights_only=True); CheckpointError if missing, corrupt or foreign."""
    return load_torch(path, MODEL_FORMAT, hint="Run `dvc repro pretrain` to rebuild it.")


def load_model(path, use_ema: bool = True, rebuild=None):
    """(model in eval mode, Diffusion, image_shape, meta) from a model file; CheckpointError if the weights do not fit.

    A pruned expert's file (meta['pruning']) needs `rebuild(model, record, image_shape, path)` to shape the unpruned
    model first: load those with `stepwise.pruning.load_pruned`, which passes it.
    """
    from .diffusion import Diffusion
    from .models import build_model

    obj = load_model_file(path)
    c, h, w = obj["image_shape"]
    diffusion = Diffusion.from_config(obj["diffusion"])
    model = build_model(obj["model"], image_size=h, channels=c, out_channels=c * diffusion.out_channels_factor)
    record = obj["meta"].get("pruning")
    try:
        if record is not None:
            if rebuild is None:
                raise CheckpointError(f"{path} holds a pruned expert: load it with stepwise.pruning.load_pruned")
            model = rebuild(model, record, (c, h, w), path)
        model.load_state_dict(obj["ema_state_dict" if use_ema else "state_dict"])
        diffusion.load_state_dict(obj.get("diffusion_state") or {})
    except (ConfigError, RuntimeError) as e:
        what = ("the pruned weights do not fit the model rebuilt from its config and pruning ratios" if record
                else "weights do not fit the model it describes")
        rerun = "; rerun `dvc repro prune`" if record else ""
        raise CheckpointError(f"{path}: {what} ({str(e).splitlines()[0]}){rerun}") from None
    return model.eval(), diffusion.eval(), (c, h, w), obj["meta"]


def load_denoiser(path, use_ema: bool = True):
    """(model in eval mode, Diffusion, image_shape) from a model file: `load_model` without the meta."""
    return load_model(path, use_ema)[:3]


# ---- samples file ---------------------------------------------------------------------------------------------


def save_samples(images: torch.Tensor, scfg, path) -> None:
    """uint8 samples (N, C, H, W) with the sample settings (a SampleConfig) they were drawn with."""
    save_torch({"format": SAMPLES_FORMAT, "images": images, "sampler": scfg.sampler, "steps": scfg.steps,
                "seed": scfg.seed}, path)


def load_samples(path, scfg) -> torch.Tensor:
    """uint8 samples (N, C, H, W) of `save_samples`; ConfigError if drawn with other sample settings than `scfg`."""
    obj = load_torch(path, SAMPLES_FORMAT, error=DataError, hint="Rerun the evaluate stage that writes it.")
    drawn = (obj["sampler"], obj["steps"], obj["seed"])
    if drawn != (scfg.sampler, scfg.steps, scfg.seed):
        raise ConfigError(f"{path} was sampled with (sampler, steps, seed)={drawn}, params say "
                          f"{(scfg.sampler, scfg.steps, scfg.seed)}: rerun the stage that writes it")
    return obj["images"]


# ---- groups file, dataset card --------------------------------------------------------------------------------


def load_groups(path, K: int, T: int) -> list[tuple[int, int]]:
    """The K [lo, hi) groups of groups.json; ConfigError if missing, malformed or written for another K or T."""
    from .grouping import groups_from_dict

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run `dvc repro cluster`")
    try:
        record = json.loads(path.read_text())
        groups = groups_from_dict(record)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}; rerun `dvc repro cluster`") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: not a groups file ({type(e).__name__}: {str(e)[:200]}); rerun "
                          "`dvc repro cluster`") from None
    if len(groups) != K or record.get("T") != T:
        raise ConfigError(f"{path} holds {len(groups)} groups of T={record['T']} but tdc.num_groups={K}, T={T}: "
                          "rerun `dvc repro cluster`")
    return groups


def train_sha(data_dir) -> str:
    """sha256 of the prepared training split, from the dataset card <data_dir>/card.json; DataError if unreadable."""
    path = Path(data_dir) / "card.json"
    try:
        return json.loads(path.read_text())["splits"]["train"]["sha256"]
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run `dvc repro prepare`") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a dataset card with splits.train.sha256 ({type(e).__name__}: {e}); rerun "
                        "`dvc repro prepare`") from None


def load_split_for(model_path, meta: dict, shape, data_dir, split: str) -> torch.Tensor:
    """The prepared `split` images (N, C, H, W) uint8, after checking they belong to the model at `model_path`: the
    dataset its training split came from (its recorded train sha256 equals the dataset card's) and its image shape.
    ConfigError naming the files and the stage that rebuilds them otherwise (a model of another dataset would
    otherwise be scored against the wrong test images without a word)."""
    from .data import load_split

    images, _, _ = load_split(Path(data_dir) / f"{split}.pt")
    if tuple(images.shape[1:]) != tuple(shape):
        raise ConfigError(f"{model_path} makes images {list(shape)} but {Path(data_dir) / f'{split}.pt'} holds "
                          f"{list(images.shape[1:])}: they come from different datasets; rerun `dvc repro` (prepare "
                          "and the stages after it)")
    recorded, card = meta.get("data_sha256"), train_sha(data_dir)
    if recorded is not None and recorded != card:
        raise ConfigError(f"{model_path} was trained on another training split (sha256 {recorded[:12]}…) than "
                          f"{Path(data_dir) / 'card.json'} describes ({card[:12]}…): rerun `dvc repro` (prepare and "
                          "the stages after it)")
    return images


def read_metrics(path, rebuild: str) -> dict:
    """A stage's metrics JSON; DataError naming the command that writes it (`rebuild`) if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; run `{rebuild}`")
    return json.loads(path.read_text())


# ---- CSV tables -----------------------------------------------------------------------------------------------


def table_text(header: list, rows) -> str:
    """CSV text: the header, then one line per row; None is an empty cell, a 0-dim tensor its value, floats keep
    repr precision."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v.item() if isinstance(v, torch.Tensor) else v for v in row])
    return out.getvalue()


def write_table(path, header: list, rows) -> None:
    """Write `table_text(header, rows)` to `path` atomically."""
    write_text(table_text(header, rows), path)


def records_table(records: list[dict], first: str = "step") -> tuple[list[str], list[list]]:
    """(header, rows) of dicts with possibly different keys: every key once, `first` leading, the rest sorted; a
    key a record lacks is an empty cell (e.g. the training history: step, loss, lr, loss_t000-099, ...)."""
    header = sorted({k for r in records for k in r}, key=lambda k: (k != first, k))
    return header, [[r.get(k) for k in header] for r in records]


def write_bin_curves(history: list[dict], out_dir, name: str = "loss") -> list[Path]:
    """One CSV (step, <name>) per t-bin of the training history in `out_dir`, named by its t-range
    (`t000-099.csv`): `dvc plots` draws one line per file, labelled with its t-range, for any T and bin count."""
    from .schedules import parse_bin_key

    keys = sorted(((p[1], key) for r in history for key in r if (p := parse_bin_key(key)) and p[0] == name),
                  key=lambda item: item[0])
    paths = []
    for _, key in dict.fromkeys(keys):
        path = Path(out_dir) / f"{key[len(name) + 1:]}.csv"
        write_table(path, ["step", name], [[r["step"], r[key]] for r in history if key in r and "step" in r])
        paths.append(path)
    return paths


def read_table(path, rebuild: str) -> list[dict[str, float]]:
    """Rows of a numeric CSV with a header as {column: float}, empty cells left out; DataError naming the stage that
    writes it (`rebuild`, e.g. 'dvc repro profile') if it is missing or has no rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; run `{rebuild}` to write it")
    try:
        rows = [{k: float(v) for k, v in raw.items() if k and v not in ("", None)}
                for raw in csv.DictReader(io.StringIO(path.read_text()))]
    except ValueError as e:
        raise DataError(f"{path}: not a numeric table ({e}); rerun `{rebuild}`") from None
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows


def table_columns(rows: list[dict[str, float]]) -> dict[str, torch.Tensor]:
    """Rows of `read_table` as {column: float64 tensor (rows,)}, columns in the order of the first row."""
    return {name: torch.tensor([r.get(name, math.nan) for r in rows], dtype=torch.float64) for name in rows[0]}
