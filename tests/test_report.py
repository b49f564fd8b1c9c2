"""stepwise.report: the pipeline report built from a fake output tree in the real formats (tests/data/report: the
metrics and training history of one default `dvc repro`, frozen so that rerunning the pipeline changes no test)."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from stepwise.errors import DataError
from stepwise.grouping import groups_to_dict
from stepwise.report import (INPUTS, build_report, metric_tables, render_html, render_markdown, verdict,
                             write_metric_tables, write_report)
from stepwise.schedules import NoiseSchedule, bin_key, bin_label, bin_range, parse_bin_key
from stepwise.visualise import save_grid

REPO = Path(__file__).resolve().parents[1]
FROZEN = REPO / "tests" / "data" / "report"
T = 1000
GROUPS = [(0, 31), (31, 303), (303, 722), (722, 1000)]


def tiny_grid(path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    save_grid(torch.randint(0, 256, (4, 1, 8, 8), generator=g, dtype=torch.uint8), path, min_width=32)


def fake_tree(root: Path, pruning: bool = True, tdc: bool = True) -> Path:
    """A pipeline output tree: the committed metrics and training history, small synthetic images and tables."""
    (root / "metrics").mkdir(parents=True)
    for name in ["evaluate.json"] + (["evaluate_tdc.json"] if tdc else []):
        shutil.copy(FROZEN / name, root / "metrics" / name)
    if pruning:
        for f in FROZEN.glob("prune_*.json"):
            shutil.copy(f, root / "metrics" / f.name)
        shutil.copy(FROZEN / "evaluate_pruned.json", root / "metrics" / "evaluate_pruned.json")
    (root / "plots").mkdir()
    lines = (FROZEN / "pretrain_loss.csv").read_text().splitlines()
    header = re.sub(r"loss(_var)?_bin/(\d+)", lambda m: bin_key(int(m[2]), 10, T, "loss" + (m[1] or "")), lines[0])
    (root / "plots" / "pretrain_loss.csv").write_text("\n".join([header] + lines[1::10]) + "\n")
    card = {"name": "fashion_mnist", "source": "idx files", "classes": ["T-shirt", "Trouser"],
            "splits": {s: {"count": n, "shape": [1, 28, 28], "mean": [0.286], "std": [0.353], "sha256": "ab" * 32,
                           "file": f"{s}.pt"} for s, n in (("train", 100), ("test", 20))}}
    (root / "data" / "prepared").mkdir(parents=True)
    (root / "data" / "prepared" / "card.json").write_text(json.dumps(card))
    tiny_grid(root / "data" / "prepared" / "train_grid.png", 0)
    for i, model in enumerate(["unified"] + (["continued", "tdc"] if tdc else []) + (["pruned"] if pruning else [])):
        tiny_grid(root / "samples" / model / "grid.png", i + 1)
    if tdc:
        (root / "outputs" / "profile").mkdir(parents=True)
        ts = [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
        rows = ["t,snr_db,loss_mean,loss_var,log_loss_mean,convergence_speed,rel_entropy_gauss,grad_sim_mean,"
                "grad_sim_next"] + [f"{t},{20 - t / 30},{0.5 * 0.99 ** t},{0.01 * 0.99 ** t},0.0,{0.1 + t / 2000},"
                                    f"0.01,{0.5 - t / 4000},0.9" for t in ts]
        (root / "outputs" / "profile" / "profile.csv").write_text("\n".join(rows) + "\n")
        snr_db = NoiseSchedule("linear", T).snr_db().double()
        (root / "outputs" / "groups.json").write_text(json.dumps(groups_to_dict(GROUPS, T, "dp", snr_db=snr_db)))
        (root / "outputs" / "consistency").mkdir()
        split = ["pair,split_t,feature_l2,feature_l2_std,mse,mse_std,ssim,ssim_std"]
        for s, d in ((0, 0.0), (100, 0.01), (250, 0.02), (500, 0.05), (750, 0.08), (900, 0.09), (1000, 0.1)):
            split.append(f"unified_to_tdc,{s},{d * 30},{d},{d},{d / 2},{1 - d * 4},{d}")
        (root / "outputs" / "consistency" / "split.csv").write_text("\n".join(split) + "\n")
    return root


def plant(path: Path, **values) -> None:
    obj = json.loads(path.read_text())
    obj.update(values)
    path.write_text(json.dumps(obj))


@pytest.fixture
def tree(tmp_path):
    root = fake_tree(tmp_path / "run")
    # tdc vs continued: interval excludes 0 (TDC worse); tdc vs unified: interval contains 0
    plant(root / "metrics" / "evaluate_tdc.json", **{
        "delta_tdc_vs_continued.fid_featnet_lo": 1.25, "delta_tdc_vs_continued.fid_featnet_hi": 5.5,
        "delta_tdc_vs_unified.fid_featnet_lo": -0.75, "delta_tdc_vs_unified.fid_featnet_hi": 9.0,
        "tdc.fid_featnet_lo": 42.0, "tdc.fid_featnet_hi": 46.5})
    plant(root / "metrics" / "evaluate.json", fid_featnet_lo=38.5, fid_featnet_hi=41.75)
    return root


def render(root: Path):
    report = build_report(T, root=root)
    write_report(report, root / "reports" / "pipeline.md", root / "reports" / "pipeline.html")
    return report, (root / "reports" / "pipeline.md").read_text(), (root / "reports" / "pipeline.html").read_text()


def test_report_sections_images_and_no_urls(tree):
    report, md, page = render(tree)
    for title in ("Dataset", "Samples and sample quality", "Training loss per timestep bin",
                  "Difficulty profile and timestep groups", "Consistency", "Pruning trade-off", "Verdicts"):
        assert f"## {title}" in md and f"<h2>{title}</h2>" in page
    # 5 grids (train + 4 models) + loss bins + profile + consistency + pruning charts, all embedded
    assert page.count("data:image/png;base64,") == 9
    assert page.count("<img") == 9
    assert "http" not in page and "http" not in md
    assert "not run" not in page
    assert page.count('class="grid small"') == 5  # the tiny grids are scaled up without smoothing
    # loss-bin chart legend names t-ranges; md links the on-disk grids relatively
    assert "](../samples/tdc/grid.png)" in md and "](../data/prepared/train_grid.png)" in md
    assert "FID 44.44 [42.00, 46.50]" in page  # tdc grid caption with its interval
    assert "continued — FID 41.00 (no interval)" in page
    assert "[0, 31)" in page and "[722, 1000)" in page  # groups table


def test_verdicts_follow_the_intervals(tree):
    report, md, page = render(tree)
    assert ("TDC ensemble vs compute-matched continued model: ΔFID +3.44 [95 % interval 1.25, 5.50] — "
            "resolved (worse)") in md
    assert ("TDC ensemble vs the unified model it was fine-tuned from: ΔFID +4.36 [95 % interval -0.75, 9.00] — "
            "not resolved") in md
    assert "Pruned TDC ensemble vs the unified model: ΔFID +12.61 — no interval: not resolved" in md
    assert report.verdicts == {"tdc_vs_unified": "not resolved", "tdc_vs_continued": "resolved (worse)",
                               "pruned_vs_tdc": "no interval: not resolved",
                               "pruned_vs_unified": "no interval: not resolved"}
    assert "resolved (worse)" in page


def test_verdict_words():
    assert verdict(None) == "no interval: not resolved"
    assert verdict((-1.0, 2.0)) == "not resolved"
    assert verdict((0.5, 2.0)) == "resolved (worse)"
    assert verdict((-2.0, -0.5)) == "resolved (better)"
    assert verdict((-2.0, -0.5), lower_is_better=False) == "resolved (worse)"
    assert verdict((0.0, 1.0)) == "not resolved"  # 0 on the edge is not excluded


def test_headline_metrics(tree):
    m = build_report(T, root=tree).metrics
    assert m["unified.fid_featnet"] == pytest.approx(40.0846, abs=1e-3)
    assert (m["unified.fid_featnet_lo"], m["unified.fid_featnet_hi"]) == (38.5, 41.75)
    assert m["tdc.fid_featnet"] == pytest.approx(44.4402, abs=1e-3)
    assert m["continued.recall_featnet"] == pytest.approx(0.6025, abs=1e-4)
    assert m["pruned.macs_per_sample"] == 1410062152.0
    assert m["unified.macs_per_sample"] == 1855544400.0
    assert m["speedup_vs_unified"] == pytest.approx(0.9105, abs=1e-4)
    assert m["delta_tdc_vs_continued.fid_featnet_lo"] == 1.25
    assert "pruned.fid_featnet_lo" not in m
    assert all(isinstance(v, float) for v in m.values())


def test_missing_optional_stages_say_not_run(tmp_path):
    root = fake_tree(tmp_path / "run", pruning=False, tdc=False)
    report, md, page = render(root)
    assert "not run: " in md and "dvc repro evaluate_pruned" in md and "dvc repro evaluate_tdc" in md
    assert "<code>dvc repro profile</code>" in page and "dvc repro cluster" in page
    assert "dvc repro consistency" in page
    assert report.verdicts["tdc_vs_continued"] == "not run"
    assert page.count("data:image/png;base64,") == 3  # train grid, unified grid, loss bins
    assert report.metrics["unified.fid_featnet"] == pytest.approx(40.0846, abs=1e-3)


@pytest.mark.parametrize("name", [n for n, (_, _, required) in INPUTS.items() if required])
def test_missing_required_input_names_file_and_stage(tmp_path, name):
    root = fake_tree(tmp_path / "run")
    (root / INPUTS[name][0]).unlink()
    with pytest.raises(DataError, match=re.escape(INPUTS[name][0]) + f".*dvc repro {INPUTS[name][1]}"):
        build_report(T, root=root)


def test_corrupt_inputs_name_the_file(tmp_path):
    root = fake_tree(tmp_path / "run")
    (root / "metrics" / "evaluate_tdc.json").write_text("{not json")
    with pytest.raises(DataError, match="evaluate_tdc.json.*JSON"):
        build_report(T, root=root)
    root = fake_tree(tmp_path / "run2")
    (root / "samples" / "tdc" / "grid.png").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match="grid.png: not a PNG"):
        build_report(T, root=root)


def test_report_is_deterministic(tree):
    a, b = build_report(T, root=tree), build_report(T, root=tree)
    assert render_html(a) == render_html(b)
    assert render_markdown(a, tree / "reports") == render_markdown(b, tree / "reports")


def test_loss_bins_named_by_t_range(tree):
    """The history's loss_t<lo>-<hi> columns (bin_key format) name each line of the per-bin chart."""
    path = tree / "plots" / "pretrain_loss.csv"
    assert "loss_t000-099" in path.read_text() and "loss_bin/" not in path.read_text()
    assert render_html(build_report(T, root=tree)).count("data:image/png;base64,") == 9


def test_bin_names():
    assert bin_label(0, 10, 1000) == "t000-099" and bin_label(9, 10, 1000) == "t900-999"
    assert bin_key(3, 10, 1000) == "loss_t300-399"
    assert parse_bin_key("loss_t300-399") == ("loss", 300, 400)
    assert parse_bin_key("loss_var_t0-9") == ("loss_var", 0, 10)
    assert parse_bin_key("loss_bin/03") is None and parse_bin_key("loss") is None
    for bins, T_ in ((10, 1000), (3, 10), (7, 50), (1, 5)):
        ranges = [bin_range(k, bins, T_) for k in range(bins)]
        assert ranges[0][0] == 0 and ranges[-1][1] == T_
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        for k, (lo, hi) in enumerate(ranges):  # the same bins as training's t * bins // T
            assert all(t * bins // T_ == k for t in range(lo, hi))
            assert parse_bin_key(bin_key(k, bins, T_)) == ("loss", lo, hi)


def test_metric_tables_are_comparable_rows(tree, tmp_path):
    """`dvc metrics show reports/tables/models` is one table: one file per model, the same quality columns in each."""
    report = build_report(T, root=tree)
    tables = metric_tables(report)
    models = {k: v for k, v in tables.items() if k.startswith("models/")}
    claims = {k: v for k, v in tables.items() if k.startswith("claims/")}
    assert sorted(models) == ["models/continued.json", "models/pruned.json", "models/tdc.json", "models/unified.json"]
    quality = {f"{m}_featnet" for m in ("fid", "kid", "precision", "recall", "f_score")}
    assert all(quality <= set(row) for row in models.values())
    assert models["models/tdc.json"]["fid_featnet_lo"] == 42.0
    assert models["models/pruned.json"]["speedup_vs_unified"] == pytest.approx(0.9105, abs=1e-4)
    assert claims["claims/tdc_vs_continued.json"] == {"delta_fid_featnet": pytest.approx(3.44, abs=0.01),
                                                      "delta_fid_featnet_lo": 1.25, "delta_fid_featnet_hi": 5.5,
                                                      "resolved": 1.0}
    assert claims["claims/tdc_vs_unified.json"]["resolved"] == 0.0  # its interval contains 0
    assert claims["claims/pruned_vs_unified.json"]["resolved"] == 0.0  # no interval
    out = tmp_path / "tables"
    (out / "models").mkdir(parents=True)
    (out / "models" / "stale.json").write_text("{}")  # a row of a model no longer reported
    written = write_metric_tables(report, out)
    assert sorted(p.relative_to(out).as_posix() for p in written) == sorted(tables)
    assert not (out / "models" / "stale.json").exists()
    assert json.loads((out / "claims" / "tdc_vs_continued.json").read_text())["resolved"] == 1.0


def test_metric_tables_omit_models_not_run(tmp_path):
    report = build_report(T, root=fake_tree(tmp_path / "run", pruning=False, tdc=False))
    assert sorted(metric_tables(report)) == ["models/unified.json"]


def test_dvc_yaml_declares_every_metric_table_row():
    """The report stage's metrics in dvc.yaml are exactly one file per model and per claim of stepwise/report.py."""
    import yaml

    from stepwise.report import CLAIMS, MODELS

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["report"]
    declared = {next(iter(m)) if isinstance(m, dict) else m for m in stage["metrics"]}
    assert declared == {f"reports/tables/models/{m}.json" for m in MODELS} | \
        {f"reports/tables/claims/{c}.json" for c in CLAIMS}
    assert "--tables reports/tables" in stage["cmd"]
