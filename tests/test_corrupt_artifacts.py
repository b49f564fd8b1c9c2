"""Property-based: any corruption of any pipeline artifact makes its loader raise the project's error (a StepwiseError:
one line on stderr and exit 2 from a stage), never a traceback, and the message names the file.

Each artifact is written valid by the library's own writer, then corrupted: truncated, random bytes, emptied, replaced
by a valid file of another artifact type, and by kind: torch and JSON files hold something other than a mapping, lack
a required entry or hold one of the wrong type; CSV tables lose their rows, a required column or a cell of a row,
gain a cell, or hold text or NaN where a number must be; params.yaml loses a section, holds one of the wrong type or
is not YAML; a PNG has a flipped byte. Truncation is at a random byte where it is detectable: anywhere in a binary
file, before the closing brace of JSON, inside a CSV record (a CSV cut between records, or a number cut short, is a
valid table), before params.yaml's last required section (missing keys in a section take conf/'s defaults).
"""
from __future__ import annotations

import csv
import io
import json
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import pipeline_copy, run
from stages.compose import compose
from stepwise.artifacts import (load_groups, load_model, load_samples, read_metrics, read_table, records_table,
                                save_model, save_samples, train_sha, write_table)
from stepwise.checkpoint import load_latest_checkpoint
from stepwise.config import SampleConfig, TrainConfig, load_config, parse
from stepwise.data import load_split, make_synthetic, save_split
from stepwise.diffusion import Diffusion
from stepwise.errors import StepwiseError
from stepwise.featnet import FeatNet, load_featnet, save_featnet
from stepwise.grouping import groups_to_dict
from stepwise.io import save_torch, write_json, write_text
from stepwise.models import build_model
from stepwise.pruning import MemoryBank, count_macs, example_inputs, proxy_search, prune_to_budget
from stepwise.pruning.expert import SEARCH_FORMAT, prepare_bank
from stepwise.pruning.model_file import load_pruned, pruning_record
from stepwise.report import build_report
from stepwise.schedules import NoiseSchedule
from stepwise.training import train
from stepwise.visualise import save_grid

pytestmark = pytest.mark.usefixtures("one_thread")

T, RES = 10, 8
MODEL = {"name": "unet", "base_channels": 8, "channel_mult": [1], "num_res_blocks": 1, "attn_resolutions": [],
         "head_dim": 8, "dropout": 0.0}
DIFFUSION = {"schedule": "linear", "T": T, "prediction": "eps"}
SAMPLE = SampleConfig(steps=5, seed=3)
SEARCH = {"format": SEARCH_FORMAT, "group": 0, "lo": 0, "hi": 4, "fingerprint": "f00d"}
SETTINGS = settings(max_examples=40, deadline=None, report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ---- the artifacts: writer, loader, what a corruption may change ---------------------------------------------------
@dataclass
class Artifact:
    """One artifact type: its kind (torch, json, csv, yaml, png), file name, loader (path -> anything) and, for the
    entry-level corruptions, `entries`: (path into the payload, how it may be corrupted: 'd' delete, 't' wrong type,
    categories of value that are valid there besides the current one). `accepts`: other artifact types whose files
    the loader rightly reads (left out of "a valid file of another type"). CSV tables: the columns that must hold a
    finite number, other required columns, columns of text."""

    kind: str
    name: str
    load: Callable[[Path], object]
    entries: list[tuple[tuple, str, tuple]] = field(default_factory=list)
    accepts: tuple[str, ...] = ()
    finite: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    text: tuple[str, ...] = ()
    beside: dict[str, str] = field(default_factory=dict)  # files written next to it: name -> artifact type


def load_bank(path: Path):
    """As the prune stage reads it: search.json beside it says it is this search's, then the bank is opened."""
    prepare_bank(path, path.parent / "search.json", SEARCH)
    return MemoryBank.open(path, json.loads(VALID["bank"].decode())["meta"])


def entries(*specs) -> list[tuple[tuple, str, tuple]]:
    """(path, modes, valid other categories) from ('a.b.0', 'dt') or ('a.b', 't', ('none',)) specs."""
    out = []
    for spec in specs:
        path, modes, *extra = spec
        keys = tuple(int(k) if k.isdigit() else k for k in path.split(".")) if isinstance(path, str) else path
        out.append((keys, modes, extra[0] if extra else ()))
    return out


TOP_MODEL = [(k, "dt") for k in ("model", "diffusion", "image_shape", "state_dict", "ema_state_dict",
                                 "diffusion_state", "meta")]
ARTIFACTS = {
    "split": Artifact("torch", "train.pt", load_split, entries(("images", "dt"), ("labels", "dt"), ("classes", "dt"))),
    "card": Artifact("json", "card.json", lambda p: train_sha(p.parent),
                     entries(("splits", "dt"), ("splits.train", "dt"), ("splits.train.sha256", "dt"))),
    "model": Artifact("torch", "model.pt", load_model, entries(
        *TOP_MODEL, ("image_shape.0", "dt"), ("model.name", "dt"), ("model.base_channels", "t"),
        ("diffusion.schedule", "dt"), ("diffusion.T", "dt"), ("ema_state_dict.FIRST", "dt"))),
    "pruned": Artifact("torch", "model.pt", load_pruned, entries(
        *TOP_MODEL, ("meta.pruning", "dt"), ("meta.pruning.format", "dt"), ("meta.pruning.ratios", "dt"),
        ("meta.pruning.ignored", "dt"), ("ema_state_dict.FIRST", "dt")), accepts=("model",)),
    "samples": Artifact("torch", "samples.pt", lambda p: load_samples(p, SAMPLE),
                        entries(("images", "dt"), ("sampler", "dt"), ("steps", "dt"), ("seed", "dt"))),
    "groups": Artifact("json", "groups.json", lambda p: load_groups(p, 2, T), entries(
        ("format", "dt"), ("T", "dt"), ("groups", "dt"), ("groups.0", "dt"), ("groups.0.index", "dt"),
        ("groups.1.lo", "dt"), ("groups.0.hi", "dt"))),
    "featnet": Artifact("torch", "featnet.pt", load_featnet, entries(
        ("args", "dt"), ("state_dict", "dt"), ("meta", "dt"), ("args.channels", "dt"), ("state_dict.FIRST", "dt"))),
    "checkpoint": Artifact("torch", "step_00000002.pt", lambda p: load_latest_checkpoint(p.parent, "fp"), entries(
        *[(k, "dt") for k in ("step", "fingerprint", "model", "ema", "optimizer", "sampler", "diffusion", "history")],
        ("momentum", "d"))),
    "metrics": Artifact("json", "evaluate.json", lambda p: read_metrics(p, "dvc repro evaluate"),
                        entries(("fid_featnet", "t"), ("num_samples", "t"))),
    "history": Artifact("csv", "pretrain_loss.csv", lambda p: read_table(p, "dvc repro pretrain", ("step",)),
                        finite=("step",)),
    # the profile and the similarity matrix are both numeric tables over t: each reads the other
    "profile": Artifact("csv", "profile.csv", lambda p: read_table(p, "dvc repro profile", ("t",)), finite=("t",),
                        accepts=("similarity",)),
    "similarity": Artifact("csv", "similarity.csv", lambda p: read_table(p, "dvc repro profile", ("t",)),
                           finite=("t",), accepts=("profile",)),
    "bank": Artifact("json", "bank.json", load_bank, entries(
        ("format", "dt"), ("meta", "dt"), ("rounds", "dt"), ("meta.budget", "dt"), ("rounds.0", "dt"),
        ("rounds.1", "t"), ("rounds.0.round", "dt"), ("rounds.1.score", "dt", ("none",)), ("rounds.0.ratios", "dt"),
        ("rounds.1.macs", "dt"), ("rounds.0.decision", "dt")), beside={"search.json": "search"}),
    "search": Artifact("json", "search.json", lambda p: prepare_bank(p.parent / "bank.json", p, SEARCH),
                       entries(("fingerprint", "dt"))),
    "params": Artifact("yaml", "params.yaml", load_config, entries(
        *[(s, "dt") for s in ("data", "model", "diffusion", "train", "sample", "eval", "tdc")])),
}


def write_valid(root: Path) -> dict[str, Path]:
    """Every artifact type written valid by the library's own writer under `root`."""
    torch.manual_seed(0)
    synth = make_synthetic(image_size=RES, num_train=16, num_test=8)
    (images, labels), classes = synth["splits"]["train"], synth["classes"]
    paths = {name: root / name / a.name for name, a in ARTIFACTS.items()}
    entry = save_split(paths["split"], images, labels, classes)
    write_json({"name": "synthetic", "source": synth["source"], "classes": classes, "splits": {"train": entry}},
               paths["card"])
    model = build_model(MODEL, RES, 1, seed=0)
    diffusion = Diffusion.from_config(DIFFUSION)
    save_model(paths["model"], model_cfg=MODEL, diffusion_cfg=DIFFUSION, image_shape=(1, RES, RES),
               state_dict=model.state_dict(), ema_state_dict=model.state_dict(),
               diffusion_state=diffusion.state_dict(), meta={"steps": 2, "data_sha256": entry["sha256"]})
    inputs = example_inputs(1, RES)
    pruned, ratios, _ = prune_to_budget(model, 0.6 * count_macs(model, inputs), inputs, "magnitude")
    save_model(paths["pruned"], model_cfg=MODEL, diffusion_cfg=DIFFUSION, image_shape=(1, RES, RES),
               state_dict=pruned.state_dict(), ema_state_dict=pruned.state_dict(),
               diffusion_state=diffusion.state_dict(), meta={"pruning": pruning_record(ratios, {}, [], "magnitude")})
    save_samples(images[:4], SAMPLE, paths["samples"])
    write_json(groups_to_dict([(0, 4), (4, T)], T, "manual"), paths["groups"])
    save_featnet(FeatNet(1, len(classes), width=4, feature_dim=8), paths["featnet"], {"test_accuracy": 0.5})
    cfg = parse(TrainConfig, {"steps": 2, "batch_size": 4, "ckpt_every": 2, "log_every": 1, "loss_bins": 2,
                              "device": "cpu"}, "train")
    result = train(build_model(MODEL, RES, 1, seed=0), Diffusion.from_config(DIFFUSION), images, cfg,
                   paths["checkpoint"].parent, fingerprint="fp", progress=False)
    write_json({"fid_featnet": 40.5, "fid_featnet_lo": 38.25, "num_samples": 64}, paths["metrics"])
    write_table(paths["history"], *records_table(result["history"]))
    ts = [1, 4, 8]
    write_table(paths["profile"], ["t", "snr_db", "loss_mean", "rel_entropy_mc"],
                [[t, 10.0 - t, 0.5 / (t + 1), float("nan") if t == 1 else 0.1 * t] for t in ts])
    write_table(paths["similarity"], ["t", *ts], [[t, *[1.0 if s == t else 0.5 for s in ts]] for t in ts])
    prepare_bank(paths["bank"], paths["bank"].parent / "search.json", SEARCH)
    proxy_search(model, 0.6 * count_macs(model, inputs), inputs, lambda m: float(count_macs(m, inputs)) / 1e6,
                 paths["bank"], rounds=2, proposer="random")
    write_json(SEARCH, paths["search"])
    write_text(compose(["experiment=ci"]), paths["params"])
    return paths


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    paths = write_valid(tmp_path_factory.mktemp("valid"))
    VALID.update({name: path.read_bytes() for name, path in paths.items()})
    return paths


VALID: dict[str, bytes] = {}  # artifact type -> the bytes of its valid file (filled by the `valid` fixture)


# ---- corruptions -----------------------------------------------------------------------------------------------------
def category(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return "tensor" if isinstance(value, torch.Tensor) else type(value).__name__


WRONG = [None, "x", 7, [1, "x"], {"x": 1}]  # one value of each JSON category


def resolve(payload, path: tuple) -> tuple:
    """(container, key) of `path` in `payload`; 'FIRST' is a mapping's first key."""
    node = payload
    for k in path[:-1]:
        node = node[next(iter(node))] if k == "FIRST" else node[k]
    last = next(iter(node)) if path[-1] == "FIRST" else path[-1]
    return node, last


def parse_payload(kind: str, data: bytes):
    if kind == "torch":
        return torch.load(io.BytesIO(data), weights_only=True)
    return (json.loads if kind == "json" else yaml.safe_load)(data.decode())


def dump_payload(kind: str, obj, path: Path) -> None:
    if kind == "torch":
        save_torch(obj, path)
    elif kind == "json":
        write_json(obj, path)
    else:
        write_text(yaml.safe_dump(obj, sort_keys=False), path)


def csv_rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode())))


def csv_bytes(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


def not_a_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text != ""
    return False


@st.composite
def corruption(draw, name: str, a: Artifact, entry_level: bool | None = None) -> tuple[str, Callable[[Path], None]]:
    """(what was done, write(path)) for one corruption of artifact type `name`; `entry_level`: only (True) or none
    (False) of the missing-entry and wrong-type corruptions."""
    data = VALID[name]
    kinds = ["truncated", "random bytes", "empty", "another artifact"]
    kinds += {"torch": ["not a mapping", "missing entry", "wrong type"],
              "json": ["not a mapping", "missing entry", "wrong type"],
              "yaml": ["not a mapping", "missing entry", "wrong type", "not YAML"],
              "csv": ["header only", "missing column", "non-finite cell", "text cell", "ragged row"],
              "png": ["flipped byte"]}[a.kind]
    if not any("d" in modes for _, modes, _ in a.entries) and "missing entry" in kinds:
        kinds.remove("missing entry")
    if entry_level is not None:
        kinds = [k for k in kinds if (k in ("missing entry", "wrong type")) == entry_level]
    kind = draw(st.sampled_from(kinds))
    raw = None
    if kind == "truncated":
        if a.kind == "csv":  # cut inside a data record, before its last cell
            lines = data.decode().splitlines(keepends=True)
            i = draw(st.integers(1, len(lines) - 1))
            cut = draw(st.integers(1, lines[i].rindex(",")))
            raw = "".join(lines[:i]).encode() + lines[i][:cut].encode()
        else:
            end = len(data) - 1  # binary: anywhere
            if a.kind == "json":  # before the closing brace
                end = len(data) - 2
            elif a.kind == "yaml":  # before the last required section
                end = max(data.find(f"\n{path[0]}:".encode()) for path, _, _ in a.entries)
            raw = data[: draw(st.integers(0, end))]
    elif kind == "random bytes":
        noise = draw(st.binary(max_size=256))
        at = draw(st.integers(0, len(noise)))
        raw = noise[:at] + b"\xff" + noise[at:]  # 0xff never occurs in UTF-8: never text
    elif kind == "empty":
        raw = b""
    elif kind == "another artifact":
        other = draw(st.sampled_from([n for n in ARTIFACTS if n != name and n not in a.accepts]))
        raw = VALID[other]
    elif kind == "flipped byte":
        at = draw(st.integers(8, len(data) - 1))
        raw = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    elif kind == "not YAML":
        raw = data.replace(b"\n  ", b"\n\t", 1)
    elif kind in ("header only", "missing column", "non-finite cell", "text cell", "ragged row"):
        rows = csv_rows(data)
        r = draw(st.integers(1, len(rows) - 1))
        if kind == "header only":
            rows = rows[:1]
        elif kind == "missing column":
            c = rows[0].index(draw(st.sampled_from(a.finite + a.required)))
            rows = [row[:c] + row[c + 1:] for row in rows]
        elif kind == "non-finite cell":
            rows[r][rows[0].index(draw(st.sampled_from(a.finite)))] = draw(st.sampled_from(["nan", "inf", "-inf", ""]))
        elif kind == "text cell":
            c = draw(st.sampled_from([i for i, h in enumerate(rows[0]) if h not in a.text]))
            # no line breaks: a bare \r is not quoted by csv.writer and ends the row when read
            text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12)
            rows[r][c] = draw(text.filter(not_a_number))
        else:
            rows[r] = rows[r] + ["1.0"] if draw(st.booleans()) else rows[r][:-1]
        raw = csv_bytes(rows)
    if raw is not None:
        return kind, lambda path: path.write_bytes(raw)
    payload = parse_payload(a.kind, data)
    if kind == "not a mapping":
        obj = draw(st.sampled_from([[1, 2], 7, "text", None, [payload]] + ([torch.zeros(2)] if a.kind == "torch"
                                                                            else [])))
        return kind, lambda path: dump_payload(a.kind, obj, path)
    mode = "d" if kind == "missing entry" else "t"
    path_, _, legit = draw(st.sampled_from([e for e in a.entries if mode in e[1]]))
    node, key = resolve(payload, path_)
    if mode == "d":
        del node[key]
    else:
        node[key] = draw(st.sampled_from([v for v in WRONG if category(v) not in {category(node[key]), *legit}]))
    return f"{kind} at {path_}", lambda path: dump_payload(a.kind, payload, path)


def assert_one_line_error(load, path: Path, what: str) -> None:
    """`load(path)` raises a StepwiseError of one line (< 600 characters) naming `path`, and warns nothing."""
    with warnings.catch_warnings(record=True) as caught, pytest.raises(StepwiseError) as info:
        load(path)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 600 and str(path) in msg, f"{what}: {msg!r}"
    assert not [w for w in caught if not issubclass(w.category, DeprecationWarning)], f"{what}: warned {caught}"


def check_corruption(name: str, what: str, write: Callable[[Path], None]) -> None:
    a = ARTIFACTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        for beside, other in a.beside.items():
            (Path(tmp) / beside).write_bytes(VALID[other])
        path = Path(tmp) / a.name
        write(path)
        assert_one_line_error(a.load, path, what)


# ---- the properties --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_valid_files_load(valid, name):
    a = ARTIFACTS[name]
    for beside, other in a.beside.items():
        (valid[name].parent / beside).write_bytes(VALID[other])
    a.load(valid[name])


@pytest.mark.parametrize("name", list(ARTIFACTS))
@SETTINGS
@given(data=st.data())
def test_corrupt_file_raises_one_line_naming_it(valid, name, data):
    a = ARTIFACTS[name]
    what, write = data.draw(corruption(name, a, entry_level=False if name == "featnet" else None), label="corruption")
    check_corruption(name, what, write)


@settings(SETTINGS, derandomize=True)
@given(data=st.data())
def test_corrupt_featnet_entries(valid, data):
    a = ARTIFACTS["featnet"]
    what, write = data.draw(corruption("featnet", a, entry_level=True), label="corruption")
    check_corruption("featnet", what, write)


# ---- the report's inputs ---------------------------------------------------------------------------------------------
REPORT = {  # input name of stepwise.report.INPUTS -> what a corruption may change (load: set by the test)
    "card": Artifact("json", "data/prepared/card.json", None, entries(
        ("name", "dt"), ("source", "dt"), ("classes", "dt"), ("splits", "dt"), ("splits.train", "dt"),
        ("splits.train.count", "dt"), ("splits.train.mean", "dt"), ("splits.train.mean.0", "t"),
        ("splits.train.sha256", "dt")), accepts=("card",)),
    "train_grid": Artifact("png", "data/prepared/train_grid.png", None),
    "history": Artifact("csv", "plots/pretrain_loss.csv", None, finite=("step",), accepts=("history",)),
    "unified_metrics": Artifact("json", "metrics/evaluate.json", None, entries(("fid_featnet", "t")),
                                accepts=("metrics",)),
    "tdc_metrics": Artifact("json", "metrics/evaluate_tdc.json", None, entries((("tdc.fid_featnet",), "t")),
                            accepts=("metrics",)),
    "tdc_grid": Artifact("png", "samples/tdc/grid.png", None),
    "profile": Artifact("csv", "outputs/profile/profile.csv", None, finite=("t",), accepts=("profile", "similarity")),
    "groups": Artifact("json", "outputs/groups.json", None, entries(
        ("format", "dt"), ("T", "dt"), ("groups", "dt"), ("groups.0", "dt"), ("groups.0.index", "dt"),
        ("groups.1.lo", "dt"), ("groups.0.hi", "dt")), accepts=("groups",)),
    "split": Artifact("csv", "outputs/consistency/split.csv", None, finite=("split_t",), required=("pair",),
                      text=("pair",)),
    "prune_metrics": Artifact("json", "metrics/prune_0.json", None, entries(("group", "t"), ("macs_fraction", "t")),
                              accepts=("metrics",)),
    "pruned_metrics": Artifact("json", "metrics/evaluate_pruned.json", None, entries((("pruned.fid_featnet",), "t")),
                               accepts=("metrics",)),
}


def write_report_inputs(root: Path, history: bytes, profile: bytes) -> Path:
    """Every input of the report, as the stages write them (the training history and profile: the valid ones)."""
    synth = make_synthetic(image_size=RES, num_train=16, num_test=8)
    (images, labels), classes = synth["splits"]["train"], synth["classes"]
    entry = save_split(root / "data/prepared/train.pt", images, labels, classes)
    write_json({"name": "synthetic", "source": synth["source"], "classes": classes, "splits": {"train": entry}},
               root / "data/prepared/card.json")
    for i, grid in enumerate(["data/prepared/train_grid.png", "samples/unified/grid.png", "samples/continued/grid.png",
                              "samples/tdc/grid.png", "samples/pruned/grid.png"]):
        save_grid(images[i : i + 4], root / grid, min_width=32)
    write_text(history.decode(), root / "plots/pretrain_loss.csv")
    write_text(profile.decode(), root / "outputs/profile/profile.csv")
    write_json({"fid_featnet": 40.5, "fid_featnet_lo": 38.0, "fid_featnet_hi": 43.0, "macs_per_sample": 2e6,
                "images_per_second": 100.0}, root / "metrics/evaluate.json")
    write_json({"tdc.fid_featnet": 42.0, "continued.fid_featnet": 41.0, "delta_tdc_vs_unified.fid_featnet": 1.5,
                "delta_tdc_vs_unified.fid_featnet_lo": -0.5, "delta_tdc_vs_unified.fid_featnet_hi": 3.5,
                "compute.matched": 1}, root / "metrics/evaluate_tdc.json")
    write_json({"group": 0, "lo": 0, "hi": 4, "macs_fraction": 0.6, "params": 1000, "best_score": 0.25, "steps": 2},
               root / "metrics/prune_0.json")
    write_json({"pruned.fid_featnet": 44.0, "pruned.macs_per_sample": 1.2e6, "macs_saving_vs_unified": 0.4},
               root / "metrics/evaluate_pruned.json")
    snr_db = NoiseSchedule("linear", T).snr_db().double()
    write_json(groups_to_dict([(0, 4), (4, T)], T, "dp", snr_db=snr_db), root / "outputs/groups.json")
    write_table(root / "outputs/consistency/split.csv", ["pair", "split_t", "mse", "ssim"],
                [["unified_to_tdc", s, 0.01 * s, 1 - 0.02 * s] for s in (0, 4, T)])
    return root


@pytest.fixture(scope="module")
def report_root(valid, tmp_path_factory):
    root = write_report_inputs(tmp_path_factory.mktemp("report"), VALID["history"], VALID["profile"])
    VALID.update({f"report:{name}": (root / a.name).read_bytes() for name, a in REPORT.items()})
    return root


def test_valid_report_inputs_build(report_root):
    report = build_report(T, root=report_root)
    assert [s.title for s in report.sections][:2] == ["Verdicts", "Dataset"]


@pytest.mark.parametrize("name", list(REPORT))
@settings(SETTINGS, max_examples=20)
@given(data=st.data())
def test_corrupt_report_input_raises_one_line_naming_it(report_root, name, data):
    a = REPORT[name]
    what, write = data.draw(corruption(f"report:{name}", a), label="corruption")
    path = report_root / a.name
    try:
        write(path)
        assert_one_line_error(lambda _: build_report(T, root=report_root), path, what)
    finally:
        path.write_bytes(VALID[f"report:{name}"])


# ---- a stage: one line on stderr, exit 2 -----------------------------------------------------------------------------
def test_cluster_stage_on_a_corrupt_profile_exits_2_with_one_line(valid, tmp_path):
    dest = pipeline_copy(tmp_path / "repo", ["experiment=ci"])
    profile = dest / "outputs" / "profile"
    profile.mkdir(parents=True)
    (profile / "similarity.csv").write_bytes(VALID["similarity"])
    lines = VALID["profile"].decode().splitlines(keepends=True)
    (profile / "profile.csv").write_text("".join(lines[:-1]) + lines[-1][: lines[-1].index(",")])  # cut mid-record
    proc = run([sys.executable, "-m", "stages.cluster"], dest, check=False, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("stepwise cluster: error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and proc.stderr.rstrip("\n").splitlines()[-1] == errors[0], proc.stderr[-3000:]
    assert "outputs/profile/profile.csv: line" in errors[0] and not (dest / "outputs" / "groups.json").exists()
