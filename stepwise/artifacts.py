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
import math
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError, DataError
from .io import clip, field_problem, load_torch, read_json, save_torch, write_text

MODEL_FORMAT = "stepwise-model/1"
SAMPLES_FORMAT = "stepwise-samples/1"
# the entries each file must hold, and their types (`stepwise.io.field_problem`)
MODEL_FIELDS = {"model": dict, "diffusion": dict, "image_shape": list, "state_dict": dict, "ema_state_dict": dict,
                "diffusion_state": dict, "meta": dict}
DIFFUSION_FIELDS = {"schedule": str, "T": int}  # of its diffusion config: no default may stand in for these
SAMPLES_FIELDS = {"images": torch.Tensor, "sampler": str, "steps": int, "seed": int}


# ---- model file -----------------------------------------------------------------------------------------------


def save_model(path, *, model_cfg: dict, diffusion_cfg: dict, image_shape, state_dict, ema_state_dict, meta: dict,
               diffusion_state: dict | None = None):
    """Write the trained denoiser (raw and EMA weights, plus everything needed to rebuild it) atomically."""
    save_torch({"format": MODEL_FORMAT, "model": dict(model_cfg), "diffusion": dict(diffusion_cfg),
                "image_shape": list(image_shape), "state_dict": state_dict, "ema_state_dict": ema_state_dict,
                "diffusion_state": diffusion_state or {}, "meta": meta}, path)


def load_model_file(path) -> dict:
    """Read a file written by save_model (weights_only=True); CheckpointError if missing, corrupt or foreign."""
    return load_torch(path, MODEL_FORMAT, hint="Run `dvc repro pretrain` to rebuild it.", fields=MODEL_FIELDS)


def load_model(path, use_ema: bool = True, rebuild=None):
    """(model in eval mode, Diffusion, image_shape, meta) from a model file; CheckpointError if the weights do not fit.

    A pruned expert's file (meta['pruning']) needs `rebuild(model, record, image_shape, path)` to shape the unpruned
    model first: load those with `stepwise.pruning.load_pruned`, which passes it.
    """
    from .diffusion import Diffusion
    from .models import build_model

    obj = load_model_file(path)
    problem = field_problem(obj["diffusion"], DIFFUSION_FIELDS)
    try:  # the configs are the file's: any value that does not build is a corrupt file
        if problem:
            raise ValueError(f"diffusion config: {problem}")
        c, h, w = obj["image_shape"]
        diffusion = Diffusion.from_config(obj["diffusion"])
        model = build_model(obj["model"], image_size=h, channels=c, out_channels=c * diffusion.out_channels_factor)
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its model, diffusion or image_shape entries do not build a model "
                              f"({type(e).__name__}: {clip(e)}); the file is corrupt: rerun the stage that wrote it "
                              "(`dvc repro pretrain` for the unified model)") from None
    record = obj["meta"].get("pruning")
    try:
        if record is not None:
            if rebuild is None:
                raise CheckpointError(f"{path} holds a pruned expert: load it with stepwise.pruning.load_pruned")
            model = rebuild(model, record, (c, h, w), path)
        model.load_state_dict(obj["ema_state_dict" if use_ema else "state_dict"])
        diffusion.load_state_dict(obj["diffusion_state"])
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        what = ("the pruned weights do not fit the model rebuilt from its config and pruning ratios" if record
                else "weights do not fit the model it describes")
        rerun = "; rerun `dvc repro prune`" if record else ""
        raise CheckpointError(f"{path}: {what} ({clip(e)}){rerun}") from None
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
    hint = "Rerun the evaluate stage that writes it."
    obj = load_torch(path, SAMPLES_FORMAT, error=DataError, hint=hint, fields=SAMPLES_FIELDS)
    images = obj["images"]
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError(f"{path}: images must be uint8 (N, C, H, W), found {images.dtype} {tuple(images.shape)}: the "
                        f"file is corrupt. {hint}")
    drawn = (obj["sampler"], obj["steps"], obj["seed"])
    if drawn != (scfg.sampler, scfg.steps, scfg.seed):
        raise ConfigError(f"{path} was sampled with (sampler, steps, seed)={drawn}, params say "
                          f"{(scfg.sampler, scfg.steps, scfg.seed)}: rerun the stage that writes it")
    return images


# ---- groups file, dataset card --------------------------------------------------------------------------------


def load_groups(path, K: int, T: int) -> list[tuple[int, int]]:
    """The K [lo, hi) groups of groups.json; ConfigError if missing, malformed or written for another K or T."""
    from .grouping import groups_from_dict

    record = read_json(path, "dvc repro cluster", error=ConfigError)
    try:
        groups = groups_from_dict(record)
    except ConfigError as e:
        raise ConfigError(f"{path}: {clip(e)}; rerun `dvc repro cluster`") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: not a groups record ({type(e).__name__}: {clip(e)}); rerun "
                          "`dvc repro cluster`") from None
    if len(groups) != K or record.get("T") != T:
        raise ConfigError(f"{path} holds {len(groups)} groups of T={record['T']} but tdc.num_groups={K}, T={T}: "
                          "rerun `dvc repro cluster`")
    return groups


def train_sha(data_dir) -> str:
    """sha256 of the prepared training split, from the dataset card <data_dir>/card.json; DataError if unreadable."""
    path = Path(data_dir) / "card.json"
    card = read_json(path, "dvc repro prepare")
    try:
        sha = card["splits"]["train"]["sha256"]
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: not a dataset card with splits.train.sha256 ({type(e).__name__}: {clip(e)}); rerun "
                        "`dvc repro prepare`") from None
    if not isinstance(sha, str):
        raise DataError(f"{path}: splits.train.sha256 is a {type(sha).__name__}, not a hex string; rerun "
                        "`dvc repro prepare`")
    return sha


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


def read_metrics(path, rebuild: str) -> dict[str, float]:
    """A stage's metrics JSON (one object of named numbers, as `stages.common.report_metrics` writes it); DataError
    naming the command that writes it (`rebuild`) if it is missing, corrupt or holds anything but numbers."""
    metrics = read_json(path, rebuild)
    for key, value in metrics.items():
        if not isinstance(value, (int, float)):
            raise DataError(f"{path}: metric {clip(key, 80)!r} is a {type(value).__name__}, not a number; the file is "
                            f"corrupt: rerun `{rebuild}`")
    return metrics


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


def read_table(path, rebuild: str, required: tuple[str, ...] = ()) -> list[dict[str, float]]:
    """Rows of a numeric CSV with a header as {column: float}, empty cells left out; DataError naming the stage that
    writes it (`rebuild`, e.g. 'dvc repro profile') if it is missing, not UTF-8 CSV, has no rows, a row with more or
    fewer cells than the header, a cell that is not a number, or a `required` column absent or not finite in a row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; run `{rebuild}` to write it")
    try:
        lines = [line for line in csv.reader(io.StringIO(path.read_text(encoding="utf-8"))) if line]
    except (OSError, ValueError, csv.Error) as e:  # ValueError: UnicodeDecodeError
        raise DataError(f"{path}: not a readable CSV table ({type(e).__name__}: {clip(e)}); rerun `{rebuild}`") from None
    if not lines:
        raise DataError(f"{path}: empty, not even a header; rerun `{rebuild}`")
    header, lines = lines[0], lines[1:]
    missing = [name for name in required if name not in header]
    if missing:
        raise DataError(f"{path}: no column(s) {missing} (header: {clip(header)}); rerun `{rebuild}`")
    rows = []
    for i, line in enumerate(lines, 2):
        if len(line) != len(header):
            raise DataError(f"{path}: line {i} has {len(line)} cells, the header {len(header)}: the file is truncated "
                            f"or corrupt; rerun `{rebuild}`")
        try:
            row = {k: float(v) for k, v in zip(header, line) if k and v != ""}
        except ValueError as e:
            raise DataError(f"{path}: not a numeric table (line {i}: {clip(e)}); rerun `{rebuild}`") from None
        bad = [name for name in required if not math.isfinite(row.get(name, math.nan))]
        if bad:
            raise DataError(f"{path}: line {i} has no finite value in column(s) {bad}; rerun `{rebuild}`")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no data rows; rerun `{rebuild}`")
    return rows


def table_columns(rows: list[dict[str, float]]) -> dict[str, torch.Tensor]:
    """Rows of `read_table` as {column: float64 tensor (rows,)}, columns in the order of the first row."""
    return {name: torch.tensor([r.get(name, math.nan) for r in rows], dtype=torch.float64) for name in rows[0]}
