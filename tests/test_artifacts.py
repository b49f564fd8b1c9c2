"""The artifact files of stepwise.artifacts: each writer's reader round-trips it and refuses what it cannot use with
one error naming the file and the command that rebuilds it."""
import json

import pytest
import torch

from stepwise.artifacts import (load_denoiser, load_groups, load_model, load_samples, read_metrics, read_table,
                                records_table, save_model, save_samples, table_columns, table_text, train_sha,
                                write_table)
from stepwise.config import SampleConfig
from stepwise.errors import CheckpointError, ConfigError, DataError
from stepwise.grouping import groups_to_dict


def test_table_text_cells_and_round_trip(tmp_path):
    text = table_text(["t", "x", "name"], [[torch.tensor(3), torch.tensor(0.1, dtype=torch.float64), "a"],
                                           [4, None, "b"], [5, float("nan"), "c"]])
    assert text == "t,x,name\n3,0.1,a\n4,,b\n5,nan,c\n"  # ints stay ints, floats in repr precision, None empty
    write_table(tmp_path / "t.csv", ["t", "x"], [[3, 0.1], [4, None], [5, 2.5]])
    rows = read_table(tmp_path / "t.csv", "dvc repro x")
    assert rows == [{"t": 3.0, "x": 0.1}, {"t": 4.0}, {"t": 5.0, "x": 2.5}]  # empty cells left out
    cols = table_columns(rows)
    assert list(cols) == ["t", "x"] and cols["t"].dtype == torch.float64 and torch.isnan(cols["x"][1])


def test_records_table_puts_step_first_and_leaves_gaps_empty():
    header, rows = records_table([{"step": 1, "loss": 0.5, "loss_bin/01": 0.4}, {"step": 2, "loss": 0.25}])
    assert header == ["step", "loss", "loss_bin/01"] and rows == [[1, 0.5, 0.4], [2, 0.25, None]]
    assert table_text(header, rows).splitlines()[2] == "2,0.25,"


def test_read_table_errors(tmp_path):
    with pytest.raises(DataError, match=r"x.csv: not found; run `dvc repro profile` to write it"):
        read_table(tmp_path / "x.csv", "dvc repro profile")
    (tmp_path / "h.csv").write_text("t,x\n")
    with pytest.raises(DataError, match="no data rows"):
        read_table(tmp_path / "h.csv", "dvc repro profile")
    (tmp_path / "s.csv").write_text("t,x\n1,abc\n")
    with pytest.raises(DataError, match="not a numeric table"):
        read_table(tmp_path / "s.csv", "dvc repro profile")


def test_load_groups_checks_everything(tmp_path):
    path = tmp_path / "groups.json"
    with pytest.raises(ConfigError, match=r"groups.json: not found; run `dvc repro cluster`"):
        load_groups(path, 2, 10)
    path.write_text(json.dumps(groups_to_dict([(0, 4), (4, 10)], 10, "manual")))
    assert load_groups(path, 2, 10) == [(0, 4), (4, 10)]
    for K, T in ((3, 10), (2, 20)):
        with pytest.raises(ConfigError, match=r"holds 2 groups of T=10 .* rerun `dvc repro cluster`"):
            load_groups(path, K, T)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match=r"groups.json: not a groups record.*rerun `dvc repro cluster`"):
        load_groups(path, 2, 10)
    path.write_text("{")
    with pytest.raises(ConfigError, match="rerun `dvc repro cluster`"):
        load_groups(path, 2, 10)


def test_train_sha_reads_the_card_or_names_prepare(tmp_path):
    with pytest.raises(DataError, match=r"card.json: not found; run `dvc repro prepare`"):
        train_sha(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps({"splits": {"test": {}}}))
    with pytest.raises(DataError, match="splits.train.sha256.*`dvc repro prepare`"):
        train_sha(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps({"splits": {"train": {"sha256": "ab12"}}}))
    assert train_sha(tmp_path) == "ab12"


def test_samples_file_remembers_its_settings(tmp_path):
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    save_samples(images, SampleConfig(steps=5, seed=3), tmp_path / "samples.pt")
    assert torch.equal(load_samples(tmp_path / "samples.pt", SampleConfig(steps=5, seed=3, batch_size=2)), images)
    with pytest.raises(ConfigError, match=r"sampled with \(sampler, steps, seed\)=\('ddim', 5, 3\)"):
        load_samples(tmp_path / "samples.pt", SampleConfig(steps=5, seed=4))
    with pytest.raises(DataError, match="Rerun the evaluate stage"):
        load_samples(tmp_path / "missing.pt", SampleConfig())


def test_model_file_round_trip_and_metrics(tmp_path):
    from stepwise.diffusion import Diffusion
    from stepwise.models import build_model

    cfg = {"name": "unet", "base_channels": 8, "channel_mult": [1], "num_res_blocks": 1, "attn_resolutions": []}
    model, diffusion = build_model(cfg, 8, 1, seed=0), Diffusion("linear", 10)
    raw = {k: v + 1 for k, v in model.state_dict().items()}
    save_model(tmp_path / "m.pt", model_cfg=cfg, diffusion_cfg={"schedule": "linear", "T": 10}, image_shape=(1, 8, 8),
               state_dict=raw, ema_state_dict=model.state_dict(), diffusion_state=diffusion.state_dict(),
               meta={"steps": 3})
    ema, d, shape, meta = load_model(tmp_path / "m.pt")
    assert shape == (1, 8, 8) and d.T == 10 and meta == {"steps": 3} and not ema.training
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(load_denoiser(tmp_path / "m.pt", use_ema=False)[0].state_dict()[k], v)
               for k, v in raw.items())
    with pytest.raises(CheckpointError, match="`dvc repro pretrain`"):
        load_model(tmp_path / "none.pt")
    with pytest.raises(DataError, match=r"e.json: not found; run `dvc repro evaluate`"):
        read_metrics(tmp_path / "e.json", "dvc repro evaluate")
