"""FeatNet: whole-image features, any image size and channel count, determinism, format tag, stage metrics."""
import json
from argparse import Namespace

import pytest
import torch

from stepwise.config import FeatNetConfig
from stepwise.data import make_synthetic
from stepwise.errors import CheckpointError, ConfigError
from stepwise.featnet import FEATNET_FORMAT, FeatNet, load_featnet, save_featnet, train_featnet
from stepwise.io import save_torch

TINY = FeatNetConfig(epochs=1, batch_size=32, lr=3e-3, width=4, feature_dim=8, seed=0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def synthetic(image_size=16, channels=1):
    d = make_synthetic(image_size=image_size, channels=channels, num_train=128, num_test=64, seed=0)
    return (*d["splits"]["train"], *d["splits"]["test"], len(d["classes"]))


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (1, 16)])
def test_features_see_the_whole_image(channels, size):
    """A change in the top-left corner reaches the bottom-right cell of the last map, and the features."""
    net = FeatNet(channels, 10).eval()
    x = torch.randint(0, 256, (1, channels, size, size), generator=torch.Generator().manual_seed(0)).float()
    y = x.clone()
    y[..., :3, :3] = 255 - y[..., :3, :3]  # (1, C, 3, 3) corner flipped
    with torch.no_grad():
        far_x, far_y = net.feature_map(x)[..., -1, -1], net.feature_map(y)[..., -1, -1]  # (1, 8w) far-corner cell
        assert (far_x - far_y).abs().max() > 1e-3 * far_x.abs().max()  # untrained: tiny but clearly nonzero
        feat_x, feat_y = net.features(x), net.features(y)
        assert (feat_x - feat_y).abs().max() > 1e-3 * feat_x.abs().max()
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(net.feature_map(x)[..., -1, -1].sum(), x)
    assert (grad.abs().sum(1)[0] > 0).all(), "some pixel lies outside the far-corner cell's receptive field"


def test_feature_layer_adapts_to_any_size():
    for channels, size in [(1, 8), (3, 32), (3, 45), (1, 64)]:
        net = FeatNet(channels, 5, width=4, feature_dim=12).eval()
        with torch.no_grad():
            assert net.features(torch.zeros(2, channels, size, size, dtype=torch.uint8)).shape == (2, 12)
            assert net(torch.zeros(2, channels, size, size, dtype=torch.uint8)).shape == (2, 5)


def test_training_is_deterministic_given_the_seed():
    data = synthetic()
    (a, acc_a), (b, acc_b) = (train_featnet(*data, TINY, progress=False) for _ in range(2))
    assert acc_a == acc_b
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    c, _ = train_featnet(*data, FeatNetConfig(**{**TINY.__dict__, "seed": 1}), progress=False)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_cifar_shaped_train_save_load_roundtrip(tmp_path):
    images, labels, test_images, test_labels, k = synthetic(image_size=32, channels=3)
    assert images.shape[1:] == (3, 32, 32)
    net, acc = train_featnet(images, labels, test_images, test_labels, k, TINY, progress=False)
    assert 0 <= acc <= 1
    save_featnet(net, tmp_path / "f.pt", {"test_accuracy": acc})
    loaded, meta = load_featnet(tmp_path / "f.pt")
    assert meta["test_accuracy"] == acc and loaded.args["channels"] == 3 and len(loaded.args["mean"]) == 3
    with torch.no_grad():
        assert torch.equal(net.eval().features(test_images), loaded.features(test_images))
        assert loaded.features(test_images).shape == (len(test_images), TINY.feature_dim)


def test_old_format_is_rejected_with_a_rebuild_hint(tmp_path):
    old = FeatNet(1, 10, width=4, feature_dim=8)
    save_torch({"format": "stepwise-featnet/1", "args": old.args, "state_dict": old.state_dict(), "meta": {}},
               tmp_path / "old.pt")
    with pytest.raises(CheckpointError) as e:
        load_featnet(tmp_path / "old.pt")
    assert "stepwise-featnet/1" in str(e.value) and FEATNET_FORMAT in str(e.value)
    assert "dvc repro featnet" in str(e.value)


def test_config_rejects_bad_schedule():
    with pytest.raises(ConfigError, match="warmup_fraction"):
        FeatNetConfig(warmup_fraction=1.0)
    with pytest.raises(ConfigError, match="weight_decay"):
        FeatNetConfig(weight_decay=-1.0)


def test_stage_writes_accuracy_and_evaluation_scores_the_real_fid_floor(tmp_path):
    from stages import featnet, prepare
    from stages.compose import compose
    from stepwise.config import load_config

    params = tmp_path / "params.yaml"
    params.write_text(compose(["experiment=ci"]))
    data, out, metrics = tmp_path / "data", tmp_path / "featnet.pt", tmp_path / "featnet.json"
    cfg = load_config(params)
    prepare.main(Namespace(params=str(params), out=str(data)), cfg)
    featnet.main(Namespace(params=str(params), data=str(data), out=str(out), metrics=str(metrics)), cfg)
    m = json.loads(metrics.read_text())
    assert set(m) == {"featnet_test_accuracy", "featnet_train_seconds"}
    assert 0 <= m["featnet_test_accuracy"] <= 1
    load_featnet(out)
    # the floor evaluate reports beside fid_featnet: real vs real, seeded, positive, far below train vs noise
    from stepwise.data import load_split
    from stepwise.evaluation import featnet_fid_floor, floor_subset

    train, test = (load_split(data / f"{s}.pt")[0] for s in ("train", "test"))
    subset = floor_subset(len(train), cfg.eval)
    assert torch.equal(subset, floor_subset(len(train), cfg.eval))
    floor = featnet_fid_floor(train, test, subset, out, torch.device("cpu"))
    noise = torch.randint(0, 256, test.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert 0 < floor < featnet_fid_floor(train, noise, subset, out, torch.device("cpu"))


def test_floor_subset_larger_than_train_fails_before_training():
    from stepwise.fidelity import real_subset

    with pytest.raises(ConfigError, match="num_samples=600"):
        real_subset(512, 600, seed=0)
    idx = real_subset(512, 64, seed=3)
    assert len(idx) == len(set(idx.tolist())) == 64 and torch.equal(idx, real_subset(512, 64, seed=3))
