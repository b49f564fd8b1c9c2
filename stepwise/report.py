"""The pipeline report: what a researcher sees after `dvc repro` (reports/pipeline.md and reports/pipeline.html).

`build_report` reads the pipeline's outputs (paths in INPUTS, overridable) into one list of sections; `write_report`
renders them twice: Markdown (tables and text, sample grids linked by relative path) and one self-contained HTML
page (every image embedded as a base64 PNG data URI, inline CSS, nothing fetched to view it). Sections: the dataset
card, the sample grids of every model with their FID and interval, the training loss per t-bin, the difficulty
profile with the chosen timestep groups, the consistency curves, the pruning trade-off, and a plain-words verdict
per claim of the papers (TDC, arXiv 2312.13307; Diff-Pruning, arXiv 2305.10924). A claim is called resolved only
when its difference has an interval (`<key>_lo`, `<key>_hi`) that excludes 0. A missing optional input (a stage
not run) gives a "not run" note; a missing required one a DataError naming the file and the stage that writes it.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import read_metrics
from .errors import DataError
from .io import clip, field_problem, write_json, write_text
from .schedules import parse_bin_key
from .visualise import empty_panel, figure_png, label_axes, pyplot, series_style

# name: (default path as in dvc.yaml, the stage that writes it, required)
INPUTS: dict[str, tuple[str, str, bool]] = {
    "card": ("data/prepared/card.json", "prepare", True),
    "train_grid": ("data/prepared/train_grid.png", "prepare", True),
    "history": ("plots/pretrain_loss.csv", "pretrain", True),
    "unified_metrics": ("metrics/evaluate.json", "evaluate", True),
    "unified_grid": ("samples/unified/grid.png", "evaluate", True),
    "tdc_metrics": ("metrics/evaluate_tdc.json", "evaluate_tdc", False),
    "continued_grid": ("samples/continued/grid.png", "evaluate_tdc", False),
    "tdc_grid": ("samples/tdc/grid.png", "evaluate_tdc", False),
    "profile": ("outputs/profile/profile.csv", "profile", False),
    "groups": ("outputs/groups.json", "cluster", False),
    "split": ("outputs/consistency/split.csv", "consistency", False),
    "prune_metrics": ("metrics", "prune", False),  # a folder: its prune_<group>.json files (PRUNE_METRICS)
    "pruned_metrics": ("metrics/evaluate_pruned.json", "evaluate_pruned", False),
    "pruned_grid": ("samples/pruned/grid.png", "evaluate_pruned", False),
}
# model: (description, [(metrics input, key prefix)] searched in order, grid input)
MODELS: dict[str, tuple[str, list[tuple[str, str]], str]] = {
    "unified": ("unified model (pretrained on all t)", [("unified_metrics", ""), ("pruned_metrics", "unified.")],
                "unified_grid"),
    "continued": ("unified model trained on, compute-matched to the experts", [("tdc_metrics", "continued.")],
                  "continued_grid"),
    "tdc": ("TDC ensemble (one fine-tuned expert per timestep group)",
            [("tdc_metrics", "tdc."), ("pruned_metrics", "tdc.")], "tdc_grid"),
    "pruned": ("pruned TDC ensemble", [("pruned_metrics", "pruned.")], "pruned_grid"),
}
# claim: (plain words, metrics input, key prefix of the difference a - b)
CLAIMS: dict[str, tuple[str, str, str]] = {
    "tdc_vs_unified": ("TDC ensemble vs the unified model it was fine-tuned from", "tdc_metrics",
                       "delta_tdc_vs_unified"),
    "tdc_vs_continued": ("TDC ensemble vs compute-matched continued model", "tdc_metrics", "delta_tdc_vs_continued"),
    "pruned_vs_tdc": ("Pruned TDC ensemble vs the unpruned TDC ensemble", "pruned_metrics", "delta_pruned_vs_tdc"),
    "pruned_vs_unified": ("Pruned TDC ensemble vs the unified model", "pruned_metrics", "delta_pruned_vs_unified"),
}
QUALITY = ("fid", "kid", "precision", "recall", "f_score")  # sample-quality metrics, named <metric>_<extractor>
COST = ("macs_per_sample", "images_per_second", "samples_per_second")
SPEED = ("speedup_vs_unified", "speedup_vs_tdc", "macs_saving_vs_unified", "macs_saving_vs_tdc")
INTERVAL = "95 % interval"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG file ends with
METRICS_INPUTS = ("unified_metrics", "tdc_metrics", "pruned_metrics", "prune_metrics")  # flat {name: number} files
# CSV inputs: (the x-axis column, a finite number in every row; the other required columns); every other cell is a
# number or empty, except in TEXT_COLUMNS
CSV_COLUMNS = {"history": ("step", ()), "profile": ("t", ()), "split": ("split_t", ("pair",))}
TEXT_COLUMNS = ("pair",)
CARD_FIELDS = {"name": str, "source": str, "classes": list, "splits": dict}  # the dataset card (`stages.prepare`)
SPLIT_FIELDS = {"count": int, "shape": list, "mean": list, "std": list, "sha256": str}  # `stepwise.data.save_split`
SMALL_GRID = 480  # px: narrower sample grids are scaled up in the page without smoothing (crisp pixels)
PRUNE_METRICS = "prune_*.json"  # the per-expert pruning metrics in the prune_metrics folder


# ---- the document: sections of blocks, rendered to Markdown and HTML --------------------------------------------
@dataclass
class Figure:
    """One image: PNG bytes (None: absent, `caption` says why), its caption, and its file if it has one."""

    png: bytes | None
    caption: str
    path: Path | None = None
    pixelated: bool = False  # sample grids: scale without smoothing


@dataclass
class Section:
    title: str
    blocks: list[tuple] = field(default_factory=list)  # ("p", text) | ("note", text) | ("list", [text]) |
    # ("table", header, rows) | ("figures", [Figure])

    def add(self, kind: str, *content) -> "Section":
        self.blocks.append((kind, *content))
        return self


@dataclass
class Report:
    """The report's sections, and the headline metrics for the MLflow parent run."""

    sections: list[Section]
    metrics: dict[str, float]
    verdicts: dict[str, str]


# ---- inputs ------------------------------------------------------------------------------------------------------
class Inputs:
    """The pipeline outputs the report reads: paths resolved against `root`; required ones checked on access."""

    def __init__(self, root=".", paths: dict | None = None):
        unknown = set(paths or {}) - set(INPUTS)
        if unknown:
            raise DataError(f"unknown report inputs {sorted(unknown)}; valid: {sorted(INPUTS)}")
        self.root = Path(root)
        self.paths = {name: self.root / (paths or {}).get(name, default) for name, (default, _, _) in INPUTS.items()}

    def missing(self, name: str) -> str:
        """The 'not run' note of input `name`."""
        return f"not run: {self.paths[name]} is missing (written by `dvc repro {INPUTS[name][1]}`)"

    def path(self, name: str) -> Path | None:
        """The input's path if it exists; None for a missing optional input; DataError for a missing required one."""
        p = self.paths[name]
        if p.is_file():
            return p
        if INPUTS[name][2]:
            raise DataError(f"{p}: not found; the report needs it: run `dvc repro {INPUTS[name][1]}` to write it")
        return None

    def fail(self, name: str, what: str, path: Path | None = None) -> DataError:
        return DataError(f"{path or self.paths[name]}: {clip(what, 300)}; rerun `dvc repro {INPUTS[name][1]}` to "
                         "rewrite it")

    def read(self, name: str) -> None:
        """Read and check input `name` (if present), by its kind: JSON, CSV, PNG or the prune metrics folder."""
        if name == "groups":
            self.groups()
            return
        kind = Path(INPUTS[name][0]).suffix
        {".json": self.json, ".csv": self.csv, ".png": self.png}.get(kind, lambda _: self.prune_records())(name)

    def groups(self) -> tuple[dict, list[dict]] | tuple[None, None]:
        """groups.json's record and its groups ({index, lo, hi, ...}, ints) sorted by index; (None, None) if absent."""
        from .grouping import groups_from_dict

        record = self.json("groups")
        if record is None:
            return None, None
        try:
            groups_from_dict(record)  # the checks of the stages that read it
            groups = sorted(({**g, "index": int(g["index"]), "lo": int(g["lo"]), "hi": int(g["hi"])}
                             for g in record["groups"]), key=lambda g: g["index"])
        except (KeyError, TypeError, ValueError) as e:  # ValueError: also ConfigError
            raise self.fail("groups", f"not a groups record ({type(e).__name__}: {clip(e)})") from None
        return record, groups

    def json(self, name: str, path: Path | None = None) -> dict | None:
        p = path or self.path(name)
        if p is None:
            return None
        if name in METRICS_INPUTS:
            return read_metrics(p, f"dvc repro {INPUTS[name][1]}")
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise self.fail(name, f"not valid JSON ({type(e).__name__}: {clip(e)})", p) from None
        if not isinstance(obj, dict):
            raise self.fail(name, f"expected a JSON object, found {type(obj).__name__}", p)
        return obj

    def csv(self, name: str) -> list[dict[str, str]] | None:
        """The rows of CSV input `name`, checked: as many cells as the header in every row, the CSV_COLUMNS present,
        numbers (or empty) in all cells but TEXT_COLUMNS', a finite number in the x-axis column."""
        p = self.path(name)
        if p is None:
            return None
        try:
            lines = [line for line in csv.reader(io.StringIO(p.read_text(encoding="utf-8"))) if line]
        except (OSError, ValueError, csv.Error) as e:  # ValueError: UnicodeDecodeError
            raise self.fail(name, f"not a readable CSV ({type(e).__name__}: {clip(e)})") from None
        if len(lines) < 2:
            raise self.fail(name, "no data rows")
        header, axis, others = lines[0], *CSV_COLUMNS[name]
        missing = [c for c in (axis, *others) if c not in header]
        if missing:
            raise self.fail(name, f"no column(s) {missing} (columns: {clip(header)})")
        rows = []
        for i, line in enumerate(lines[1:], 2):
            if len(line) != len(header):
                raise self.fail(name, f"line {i} has {len(line)} cells, the header {len(header)}: truncated or corrupt")
            row = dict(zip(header, line))
            try:
                values = {k: float(v) for k, v in row.items() if k not in TEXT_COLUMNS and v != ""}
            except ValueError as e:
                raise self.fail(name, f"line {i} is not numeric ({clip(e)})") from None
            if not math.isfinite(values.get(axis, math.nan)):
                raise self.fail(name, f"line {i} has no finite {axis!r}")
            rows.append(row)
        return rows

    def png(self, name: str) -> bytes | None:
        """The bytes of PNG input `name`, checked to be one complete PNG file (every chunk's CRC, the final IEND)."""
        from PIL import Image

        p = self.path(name)
        if p is None:
            return None
        data = p.read_bytes()
        if not data.startswith(PNG_SIGNATURE):
            raise self.fail(name, "not a PNG file")
        if not data.endswith(PNG_END):
            raise self.fail(name, "not a PNG file that ends complete (no IEND chunk at its end): truncated or corrupt")
        try:
            Image.open(io.BytesIO(data), formats=["PNG"]).verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many types (SyntaxError, OSError, struct.error, ...)
            raise self.fail(name, f"not a PNG file PIL can read ({type(e).__name__}: {clip(e)})") from None
        return data

    def prune_records(self) -> list[dict]:
        """The metrics/prune_<group>.json records, sorted by group."""
        records = [self.json("prune_metrics", p) for p in sorted(self.paths["prune_metrics"].glob(PRUNE_METRICS))]
        return sorted(records, key=lambda r: r.get("group", 0))


def number(value) -> float | None:
    """A finite float, or None for anything else (absent key, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def column(rows: list[dict], key: str, inputs: Inputs, name: str) -> list[float]:
    """Column `key` of CSV rows as floats (empty cells: NaN); DataError naming the file if absent or not numeric."""
    if key not in rows[0]:
        raise inputs.fail(name, f"no column {key!r} (columns: {sorted(rows[0])})")
    try:
        return [float(r[key]) if r[key] not in ("", None) else math.nan for r in rows]
    except ValueError as e:
        raise inputs.fail(name, f"column {key!r} is not numeric ({e})") from None


def interval(metrics: dict | None, key: str) -> tuple[float, float] | None:
    """(lo, hi) of metric `key` from the bootstrap keys `<key>_lo` / `<key>_hi`, if both are present."""
    if not metrics:
        return None
    lo, hi = number(metrics.get(f"{key}_lo")), number(metrics.get(f"{key}_hi"))
    return None if lo is None or hi is None else (lo, hi)


def verdict(iv: tuple[float, float] | None, lower_is_better: bool = True) -> str:
    """Plain words for a difference a - b: resolved (better/worse) only when its interval excludes 0."""
    if iv is None:
        return "no interval: not resolved"
    lo, hi = iv
    if lo <= 0 <= hi:
        return "not resolved"
    return "resolved (worse)" if (lo > 0) == lower_is_better else "resolved (better)"


def fmt(value, digits: int = 2) -> str:
    v = number(value)
    return "–" if v is None else f"{v:.{digits}f}"


def fmt_interval(iv) -> str:
    return "(no interval)" if iv is None else f"[{iv[0]:.2f}, {iv[1]:.2f}]"


def fmt_count(value) -> str:
    """1855544400 -> '1.86 G'."""
    v = number(value)
    if v is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:g}"


# ---- figures -----------------------------------------------------------------------------------------------------
def loss_bins_figure(rows: list[dict], T: int, inputs: Inputs) -> bytes:
    """Training loss of every t-bin over training steps in one chart (log y), each line named by its t-range."""
    header = list(rows[0])
    bins = sorted(((c, p[1:]) for c in header if (p := parse_bin_key(c)) and p[0] == "loss"), key=lambda b: b[1])
    steps = column(rows, "step", inputs, "history")
    fig, ax = pyplot().subplots(figsize=(11, 5))
    title = "Training loss per t-bin (unified model)"
    if not bins:
        empty_panel(ax, title, "no per-bin loss columns in the training history (train.loss_bins = 0)")
        return figure_png(fig)
    for i, (col, (lo, hi)) in enumerate(bins):
        ys = column(rows, col, inputs, "history")
        ax.plot(steps, ys, lw=1.3, ms=3, markevery=max(1, len(steps) // 12), label=f"t in [{lo}, {hi})",
                **series_style(i, len(bins), ordered=True))
    if "loss" in rows[0]:
        ax.plot(steps, column(rows, "loss", inputs, "history"), color="black", lw=1.8, label="all t")
    label_axes(ax, title, "training step", "mean loss of the bin's examples (MSE, log scale)", log=True)
    ax.legend(fontsize=8, title="timestep bin", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure_png(fig)


def group_bands(ax, groups: list[dict]) -> None:
    """Shade alternate timestep groups, draw each boundary and write the group index at the top of wide ones."""
    T = max(g["hi"] for g in groups)
    for g in groups:
        ax.axvspan(g["lo"], g["hi"], alpha=0.10, color="tab:green" if g["index"] % 2 == 0 else "0.5")
        if g["lo"] > 0:
            ax.axvline(g["lo"], color="black", lw=0.8)
        if g["hi"] - g["lo"] >= 0.06 * T:  # narrower bands: the groups table names them
            ax.text((g["lo"] + g["hi"]) / 2, 0.98, f"G{g['index']}", ha="center", va="top", fontsize=8,
                    transform=ax.get_xaxis_transform())


PROFILE_PANELS = (("loss_mean", "Loss mean", "mean MSE loss"), ("loss_var", "Loss variance", "variance of MSE loss"),
                  ("convergence_speed", "Convergence time", "fraction of the training run"),
                  ("grad_sim_mean", "Gradient similarity", "mean cosine similarity to other t"))


def profile_figure(rows: list[dict], groups: list[dict] | None, inputs: Inputs) -> bytes:
    """The difficulty measures against t with the chosen group boundaries (shaded bands, index on top)."""
    t = column(rows, "t", inputs, "profile")
    panels = [p for p in PROFILE_PANELS if p[0] in rows[0]]
    ncols = min(2, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = pyplot().subplots(nrows, ncols, figsize=(5.5 * ncols, 3.6 * nrows), squeeze=False)
    if not panels:
        empty_panel(axes[0, 0], "Difficulty profile", "profile.csv holds none of the plotted columns")
    for ax in list(axes.flat)[max(1, len(panels)):]:  # the unused cell of an odd number of panels
        ax.set_visible(False)
    for ax, (key, title, ylabel) in zip(axes.flat, panels):
        ys = column(rows, key, inputs, "profile")
        ax.plot(t, ys, **series_style(0, 1), ms=3, lw=1.2)
        if groups:
            group_bands(ax, groups)
        label_axes(ax, title, "timestep t", ylabel, values=ys)
    fig.suptitle("Difficulty profile of the unified model" + (" with the timestep groups" if groups else
                                                              " (no groups: cluster not run)"))
    return figure_png(fig)


def consistency_figure(rows: list[dict], inputs: Inputs) -> bytes:
    """Distance to model a's own samples against the split step s (a for t >= s, b below), one line per pair."""
    metrics = [k for k in ("mse", "ssim", "feature_l2") if k in rows[0]]
    units = {"mse": "MSE (pixels in [-1, 1])", "ssim": "SSIM (1 = identical)", "feature_l2": "feature L2 distance"}
    pairs = sorted({r["pair"] for r in rows})
    fig, axes = pyplot().subplots(1, max(1, len(metrics)), figsize=(4.5 * max(1, len(metrics)), 3.8), squeeze=False)
    if not metrics:
        empty_panel(axes[0, 0], "Consistency", "split.csv holds no mse, ssim or feature_l2 column")
    for ax, key in zip(axes[0], metrics):
        values = []
        for i, pair in enumerate(pairs):
            pr = [r for r in rows if r["pair"] == pair]
            xs, ys = column(pr, "split_t", inputs, "split"), column(pr, key, inputs, "split")
            values += ys
            ax.plot(xs, ys, label=pair.replace("_to_", " → "), **series_style(i, len(pairs)))
        label_axes(ax, f"{key} vs split step", "split step s (model a for t ≥ s, model b below)", units[key],
                   values=values)
        ax.legend(fontsize=8, title="a → b", title_fontsize=8)
    fig.suptitle("Consistency: samples from the same noise, model switched at s, vs model a alone")
    return figure_png(fig)


def pruning_figure(models: dict[str, dict], experts: list[dict]) -> bytes:
    """Left: FID against MACs per sample (fraction of the unified model) per model; right: each expert's MACs
    fraction against its FID if measured, else its pruning proxy score."""
    fig, (ax, ax2) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    base = number(models.get("unified", {}).get("macs_per_sample"))
    points = [(name, m) for name, m in models.items()
              if base and number(m.get("macs_per_sample")) and number(m.get("fid"))]
    if points:
        for i, (name, m) in enumerate(points):
            x, y, iv = m["macs_per_sample"] / base, m["fid"], m.get("fid_interval")
            style = series_style(i, len(points))
            yerr = None if iv is None else [[y - iv[0]], [iv[1] - y]]
            ax.errorbar([x], [y], yerr=yerr, color=style["color"], marker=style["marker"], ms=8, capsize=4,
                        linestyle="none", label=name + ("" if iv else " (no interval)"))
        label_axes(ax, "Ensembles: compute vs quality", "MACs per sample (fraction of the unified model)",
                   "FID (featnet; lower is better)")
        ax.legend(fontsize=8)
    else:
        empty_panel(ax, "Ensembles: compute vs quality", "no model has both MACs per sample and FID")
    measured = [e for e in experts if number(e.get("fid")) is not None]
    scored = measured or [e for e in experts if number(e.get("score")) is not None]
    key, ylabel = ("fid", "FID (featnet)") if measured else ("score", "proxy score (lower is better)")
    title = "Pruned experts: MACs vs " + ("FID" if measured else "proxy score")
    if scored:
        for i, e in enumerate(scored):
            style = series_style(i, len(scored))
            ax2.plot([e["macs_fraction"]], [e[key]], linestyle="none", color=style["color"], marker=style["marker"],
                     ms=8, label=f"expert {e['group']}: t in [{e['lo']}, {e['hi']})")
        label_axes(ax2, title, "MACs per forward (fraction of the unpruned expert)", ylabel,
                   values=[e[key] for e in scored])
        ax2.legend(fontsize=8)
    else:
        empty_panel(ax2, "Pruned experts", "no expert was pruned (every budget fraction is 1.0)")
    return figure_png(fig)


# ---- sections ----------------------------------------------------------------------------------------------------
def dataset_section(inputs: Inputs) -> Section:
    card = inputs.json("card")
    sec = Section("Dataset")
    problem = field_problem(card, CARD_FIELDS) or field_problem(card["splits"], {"train": dict}) or next(
        (f"split {split!r}: {field_problem(c, SPLIT_FIELDS) if isinstance(c, dict) else type(c).__name__}"
         for split, c in card["splits"].items() if not isinstance(c, dict) or field_problem(c, SPLIT_FIELDS)), None)
    if problem:
        raise inputs.fail("card", f"not a dataset card ({problem})")
    classes = card["classes"]
    sec.add("p", f"{card['name']} from {card['source']}: {len(classes)} classes"
                 + (f" ({', '.join(map(str, classes))})." if classes else "."))
    try:
        rows = [[split, str(c["count"]), "×".join(map(str, c["shape"])) or "–", ", ".join(f"{v:.3f}" for v in c["mean"]),
                 ", ".join(f"{v:.3f}" for v in c["std"]), c["sha256"][:12]] for split, c in sorted(card["splits"].items())]
    except (TypeError, ValueError) as e:  # a mean or std that is not a number
        raise inputs.fail("card", f"not a dataset card ({type(e).__name__}: {clip(e)})") from None
    sec.add("table", ["split", "images", "shape (C×H×W)", "pixel mean", "pixel std", "sha256 (first 12)"], rows)
    sec.add("figures", [Figure(inputs.png("train_grid"), "Real training images (the first 64 of the train split)",
                               inputs.paths["train_grid"], pixelated=True)])
    return sec


def model_metrics(inputs: Inputs, sources: dict[str, dict | None], extractor: str) -> dict[str, dict]:
    """Per model that was run: its quality metrics (named without the extractor), costs and FID interval."""
    out = {}
    for name, (_, where, _) in MODELS.items():
        m: dict = {}
        for source, prefix in where:
            metrics = sources.get(source) or {}
            for base in QUALITY:
                key = f"{prefix}{base}_{extractor}"
                if base not in m and number(metrics.get(key)) is not None:
                    m[base] = metrics[key]
                    m[f"{base}_interval"] = interval(metrics, key)
            for key in COST:
                if key not in m and number(metrics.get(prefix + key)) is not None:
                    m[key] = metrics[prefix + key]
        if m:
            out[name] = m
    return out


def samples_section(inputs: Inputs, models: dict[str, dict], extractor: str) -> Section:
    sec = Section("Samples and sample quality")
    sec.add("p", f"FID, KID, precision and recall of generated samples against the test split, on {extractor} "
                 f"features. Lower FID and KID are better; higher precision and recall are better. The {INTERVAL} "
                 f"is shown where the evaluation wrote one (its _lo and _hi keys); without one, no claim is made.")
    rows = []
    for name, (desc, _, _) in MODELS.items():
        if name not in models:
            rows.append([name, desc, "not run", "", "", "", "", "", ""])
            continue
        m = models[name]
        rows.append([name, desc, fmt(m.get("fid")), fmt_interval(m.get("fid_interval")), fmt(m.get("kid")),
                     fmt(m.get("precision"), 3), fmt(m.get("recall"), 3), fmt_count(m.get("macs_per_sample")),
                     fmt(m.get("images_per_second") or m.get("samples_per_second"), 1)])
    sec.add("table", ["model", "what", "FID", INTERVAL, "KID", "precision", "recall", "MACs / sample",
                      "images / s"], rows)
    figures = []
    for name, (desc, _, grid) in MODELS.items():
        png = inputs.png(grid)
        m = models.get(name)
        if png is None:
            figures.append(Figure(None, f"{name}: {inputs.missing(grid)}"))
        else:
            score = "FID not measured" if not m or "fid" not in m else \
                f"FID {fmt(m['fid'])} {fmt_interval(m.get('fid_interval'))}"
            figures.append(Figure(png, f"{name} — {score}", inputs.paths[grid], pixelated=True))
    sec.add("figures", figures)
    return sec


def loss_section(inputs: Inputs, T: int) -> Section:
    rows = inputs.csv("history")
    sec = Section("Training loss per timestep bin")
    sec.add("p", f"Mean training loss of the unified model's examples whose t fell in each equal-width bin of "
                 f"[0, {T}), per logging interval; the black line is the loss over all t.")
    sec.add("figures", [Figure(loss_bins_figure(rows, T, inputs), "Training loss per t-bin (log scale)")])
    return sec


def profile_section(inputs: Inputs) -> Section:
    sec = Section("Difficulty profile and timestep groups")
    rows, (groups_rec, groups) = inputs.csv("profile"), inputs.groups()
    if rows is None:
        sec.add("note", f"Difficulty profile {inputs.missing('profile')}")
    else:
        sec.add("figures", [Figure(profile_figure(rows, groups, inputs),
                                   "Per-timestep difficulty measures; shaded bands: the timestep groups")])
    if groups is None:
        sec.add("note", f"Timestep groups {inputs.missing('groups')}")
    else:
        sec.add("p", f"{len(groups)} groups of [0, {groups_rec.get('T', '?')}) by method "
                     f"\"{groups_rec.get('method', '?')}\".")
        sec.add("table", ["group", "t range", "width", "SNR_dB at lo", "SNR_dB at hi − 1"],
                [[str(g["index"]), f"[{g['lo']}, {g['hi']})", str(g["hi"] - g["lo"]), fmt(g.get("snr_db_lo_t")),
                  fmt(g.get("snr_db_hi_t"))] for g in groups])
    return sec


def consistency_section(inputs: Inputs) -> Section:
    sec = Section("Consistency")
    rows = inputs.csv("split")
    if rows is None:
        sec.add("note", f"Consistency curves {inputs.missing('split')}")
        return sec
    if "pair" not in rows[0]:
        raise inputs.fail("split", "no column 'pair'")
    sec.add("p", "From the same initial noise, model a denoises t ≥ s and model b t < s; each point compares those "
                 "samples with model a's own. s = 0 is model a alone, s = T is model b alone.")
    sec.add("figures", [Figure(consistency_figure(rows, inputs), "Consistency against the split step")])
    return sec


def expert_records(inputs: Inputs, pruned: dict | None, extractor: str) -> list[dict]:
    """Per pruned expert: group, t range, MACs fraction, params, proxy score, FID if measured."""
    out = []
    for r in inputs.prune_records():
        g = r.get("group")
        e = {"group": g, "lo": r.get("lo"), "hi": r.get("hi"), "macs_fraction": number(r.get("macs_fraction")),
             "params": r.get("params"), "score": number(r.get("best_score")), "steps": r.get("steps")}
        e["fid"] = number((pruned or {}).get(f"expert_{g}.fid_{extractor}"))
        if e["macs_fraction"] is None:
            e["macs_fraction"] = number((pruned or {}).get(f"expert_{g}.macs_fraction"))
        out.append(e)
    return out


def pruning_section(inputs: Inputs, models: dict[str, dict], pruned: dict | None, extractor: str) -> Section:
    sec = Section("Pruning trade-off")
    experts = expert_records(inputs, pruned, extractor)
    if pruned is None and not experts:
        sec.add("note", f"Pruning {inputs.missing('pruned_metrics')}; no {inputs.paths['prune_metrics']}/"
                        f"{PRUNE_METRICS} either (`dvc repro prune`)")
        return sec
    if pruned is None:
        sec.add("note", f"Pruned ensemble evaluation {inputs.missing('pruned_metrics')}")
    caption = "MACs against quality: ensembles (left), pruned experts (right)."
    if experts and all(e["fid"] is None for e in experts):
        caption += " No per-expert FID is measured: the right panel shows the pruning search's proxy score."
    unscored = [str(e["group"]) for e in experts if e["score"] is None and e["fid"] is None]
    if unscored:
        caption += f" Not searched (budget fraction 1.0): expert {', '.join(unscored)}."
    base = number(models.get("unified", {}).get("macs_per_sample"))
    unplaced = [n for n, m in models.items() if not (base and number(m.get("macs_per_sample")))]
    if unplaced:
        caption += f" Not placed (no MACs per sample measured): {', '.join(unplaced)}."
    sec.add("figures", [Figure(pruning_figure(models, [e for e in experts if e["macs_fraction"] is not None]),
                               caption)])
    if experts:
        sec.add("table", ["expert", "t range", "MACs fraction", "params", "proxy score", "fine-tune steps"],
                [[str(e["group"]), f"[{e['lo']}, {e['hi']})", fmt(e["macs_fraction"], 3), str(e["params"]),
                  fmt(e["score"], 4) if e["score"] is not None else "not searched", str(e["steps"])]
                 for e in experts])
    else:
        sec.add("note", f"Per-expert pruning not run: no {inputs.paths['prune_metrics']}/{PRUNE_METRICS} "
                        f"(written by `dvc repro prune`)")
    if pruned:
        parts = []
        if number(pruned.get("macs_saving_vs_unified")) is not None:
            parts.append(f"MACs saving vs the unified model {pruned['macs_saving_vs_unified']:.1%}")
        if number(pruned.get("goal.macs_saving_target")) is not None:
            met = "met" if pruned.get("goal.met") else "not met"
            parts.append(f"target {pruned['goal.macs_saving_target']:.0%}: {met}")
        for key, who in (("speedup_vs_unified", "unified"), ("speedup_vs_tdc", "TDC")):
            if number(pruned.get(key)) is not None:
                parts.append(f"wall-clock speed-up vs {who} ×{pruned[key]:.2f} (one timing, no interval)")
        if parts:
            sec.add("p", "; ".join(parts) + ".")
    return sec


def claim_line(text: str, metrics: dict | None, prefix: str, extractor: str) -> tuple[str, str]:
    """('<claim>: ΔFID +3.44 [95 % interval a, b] — resolved (worse)', verdict) for the FID difference a - b."""
    key = f"{prefix}.fid_{extractor}"
    delta = number((metrics or {}).get(key))
    if delta is None:
        return f"{text}: FID difference not measured — not resolved", "not measured"
    iv = interval(metrics, key)
    v = verdict(iv)
    where = "" if iv is None else f" [{INTERVAL} {iv[0]:.2f}, {iv[1]:.2f}]"
    return f"{text}: ΔFID {delta:+.2f}{where} — {v}", v


def verdict_section(inputs: Inputs, sources: dict[str, dict | None], extractor: str) -> tuple[Section, dict]:
    sec = Section("Verdicts")
    sec.add("p", "ΔFID = FID of the first model − FID of the second: positive means the first is worse. A claim is "
                 "resolved only when the interval of the difference excludes 0.")
    items, verdicts = [], {}
    for name, (text, source, prefix) in CLAIMS.items():
        metrics = sources.get(source)
        if metrics is None:
            items.append(f"{text}: {inputs.missing(source)}")
            verdicts[name] = "not run"
            continue
        line, verdicts[name] = claim_line(text, metrics, prefix, extractor)
        if name == "tdc_vs_continued" and number(metrics.get("compute.matched")) == 0:
            line += " (compute NOT matched: the comparison is unfair)"
        items.append(line)
    sec.add("list", items)
    return sec, verdicts


def headline_metrics(models: dict[str, dict], sources: dict[str, dict | None], extractor: str) -> dict[str, float]:
    """Each model's quality metrics (with interval ends), MACs and speed, the claims' differences, the speed-ups."""
    out = {}
    for name, m in models.items():
        for base in QUALITY:
            if base in m:
                out[f"{name}.{base}_{extractor}"] = float(m[base])
                if m.get(f"{base}_interval"):
                    out[f"{name}.{base}_{extractor}_lo"], out[f"{name}.{base}_{extractor}_hi"] = m[f"{base}_interval"]
        for key in COST:
            if key in m:
                out[f"{name}.{key}"] = float(m[key])
    for _, source, prefix in CLAIMS.values():
        metrics = sources.get(source) or {}
        for suffix in ("", "_lo", "_hi"):
            key = f"{prefix}.fid_{extractor}{suffix}"
            if number(metrics.get(key)) is not None:
                out[key] = float(metrics[key])
    pruned = sources.get("pruned_metrics") or {}
    out.update({key: float(pruned[key]) for key in SPEED if number(pruned.get(key)) is not None})
    return out


def build_report(T: int, root=".", paths: dict | None = None, extractor: str = "featnet") -> Report:
    """Read the pipeline's outputs under `root` (paths in INPUTS, overridden by `paths`) into the report.

    T is the number of diffusion steps (diffusion.T), naming the t-bins of the training history."""
    inputs = Inputs(root, paths)
    for name, (_, _, required) in INPUTS.items():  # a missing required input fails before anything is read
        if required:
            inputs.path(name)
    for name in INPUTS:  # and a corrupt one before any plotting
        inputs.read(name)
    sources = {name: inputs.json(name) for name in ("unified_metrics", "tdc_metrics", "pruned_metrics")}
    models = model_metrics(inputs, sources, extractor)
    claims, verdicts = verdict_section(inputs, sources, extractor)
    sections = [claims, dataset_section(inputs), samples_section(inputs, models, extractor),
                loss_section(inputs, T), profile_section(inputs), consistency_section(inputs),
                pruning_section(inputs, models, sources["pruned_metrics"], extractor)]
    return Report(sections, headline_metrics(models, sources, extractor), verdicts)


# ---- rendering ---------------------------------------------------------------------------------------------------
def anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def render_markdown(report: Report, md_dir) -> str:
    """The report as Markdown: tables and text; images linked relative to `md_dir`, charts in the HTML page."""
    md_dir = Path(md_dir)
    lines = ["# Pipeline report", "", "Charts are embedded in pipeline.html (self-contained, next to this file).", ""]
    for sec in report.sections:
        lines += [f"## {sec.title}", ""]
        for kind, *content in sec.blocks:
            if kind == "p":
                lines += [content[0], ""]
            elif kind == "note":
                lines += [f"> **Note:** {content[0]}", ""]
            elif kind == "list":
                lines += [f"- {item}" for item in content[0]] + [""]
            elif kind == "table":
                header, rows = content
                cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
                lines += ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows] + [""]
            elif kind == "figures":
                for f in content[0]:
                    if f.png is None:
                        lines += [f"> **Note:** {f.caption}", ""]
                    elif f.path is not None:
                        rel = Path(os.path.relpath(f.path.resolve(), md_dir.resolve())).as_posix()
                        lines += [f"![{f.caption}]({rel})", "", f"*{f.caption}*", ""]
                    else:
                        lines += [f"*Chart in pipeline.html: {f.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1240px; margin: 1.5em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; padding-bottom: .15em; }
nav ol { columns: 2; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.note { background: #fff6e0; border-left: 4px solid #e0a000; padding: .5em .8em; margin: .8em 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.gallery figure { margin: 0; flex: 1 1 calc(50% - 1em); max-width: 100%; }
.gallery.single figure { flex: 1 1 100%; }
figure img { width: 100%; height: auto; border: 1px solid #ddd; }
figure img.grid { max-width: 620px; }
figure img.small { image-rendering: pixelated; }
figure .absent { border: 1px dashed #aaa; min-height: 120px; display: flex; align-items: center;
                 justify-content: center; padding: 1em; color: #666; background: #fafafa; }
figcaption { font-size: .9em; color: #444; margin-top: .3em; }
ul.verdicts li { margin: .4em 0; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; font-size: .92em; }
"""


def png_width(png: bytes) -> int:
    """Width in pixels from a PNG's IHDR chunk."""
    return int.from_bytes(png[16:20], "big")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def inline(text: str) -> str:
    """Escaped HTML text with `command` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page: inline CSS, every image a base64 data URI."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>Pipeline report</title>", f"<style>{CSS}</style></head><body>", "<h1>Pipeline report</h1>",
           "<nav><ol>" + "".join(f'<li><a href="#{anchor(s.title)}">{e(s.title)}</a></li>' for s in report.sections)
           + "</ol></nav>"]
    for sec in report.sections:
        out.append(f'<section id="{anchor(sec.title)}"><h2>{e(sec.title)}</h2>')
        for kind, *content in sec.blocks:
            if kind == "p":
                out.append(f"<p>{inline(content[0])}</p>")
            elif kind == "note":
                out.append(f'<p class="note">{inline(content[0])}</p>')
            elif kind == "list":
                cls = ' class="verdicts"' if sec.title == "Verdicts" else ""
                out.append(f"<ul{cls}>" + "".join(f"<li>{inline(i)}</li>" for i in content[0]) + "</ul>")
            elif kind == "table":
                header, rows = content
                out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>"
                           + "".join("<tr>" + "".join(f"<td>{inline(str(c))}</td>" for c in r) + "</tr>" for r in rows)
                           + "</tbody></table>")
            elif kind == "figures":
                figs = content[0]
                out.append(f'<div class="gallery{" single" if len(figs) == 1 else ""}">')
                for f in figs:
                    if f.png is None:
                        out.append(f'<figure><div class="absent">{inline(f.caption)}</div></figure>')
                    else:
                        cls = f' class="grid{" small" if png_width(f.png) < SMALL_GRID else ""}"' if f.pixelated else ""
                        out.append(f'<figure><img{cls} alt="{e(f.caption)}" src="{data_uri(f.png)}">'
                                   f"<figcaption>{inline(f.caption)}</figcaption></figure>")
                out.append("</div>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---- `dvc metrics show` tables -------------------------------------------------------------------------------------
TABLES = ("models", "claims")  # reports/tables/<table>/<row>.json: every row of a table has the same columns


def metric_tables(report: Report) -> dict[str, dict[str, float]]:
    """The headline metrics as `dvc metrics show` tables: {'<table>/<row>.json': {column: number}}.

    models/<model>: quality metrics with their interval ends, MACs, speed (and the pruned model's speed-ups);
    claims/<claim>: the FID difference a - b (`delta_fid_<extractor>`, `_lo`, `_hi`) and `resolved` (1: the interval
    excludes 0, 0: it does not or there is none). Rows of models or claims that were not run are absent."""
    rows: dict[str, dict[str, float]] = {}
    claims = {prefix: name for name, (_, _, prefix) in CLAIMS.items()}
    for key, value in report.metrics.items():
        row, _, column = key.partition(".")
        if row in claims:
            rows.setdefault(f"claims/{claims[row]}.json", {})[f"delta_{column}"] = value
        elif column:
            rows.setdefault(f"models/{row}.json", {})[column] = value
        else:  # a speed-up of the pruned ensemble
            rows.setdefault("models/pruned.json", {})[key] = value
    for name, v in report.verdicts.items():
        if f"claims/{name}.json" in rows:
            rows[f"claims/{name}.json"]["resolved"] = float(v.startswith("resolved"))
    return rows


def write_metric_tables(report: Report, root) -> list[Path]:
    """Write `metric_tables(report)` under `root` (one JSON file per row, atomically), remove rows no longer there."""
    root = Path(root)
    rows = metric_tables(report)
    for table in TABLES:
        for stale in sorted((root / table).glob("*.json")):
            if f"{table}/{stale.name}" not in rows:
                stale.unlink()
    for name, row in rows.items():
        write_json(row, root / name)
    return [root / name for name in sorted(rows)]


def write_report(report: Report, md_path, html_path) -> None:
    """Write the Markdown and HTML renderings atomically."""
    write_text(render_markdown(report, Path(md_path).parent), md_path)
    write_text(render_html(report), html_path)
