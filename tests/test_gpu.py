"""CUDA paths: bf16 autocast training and sampling on the GPU. Run with `pytest -m gpu`; skipped without CUDA."""
import pytest
import torch

from stepwise.config import TrainConfig, parse
from stepwise.data import make_synthetic
from stepwise.diffusion import Diffusion
from stepwise.models import build_model
from stepwise.sampling import generate
from stepwise.training import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_training_and_resume_on_cuda(tmp_path):
    images = make_synthetic(num_train=256)["splits"]["train"][0]
    model = dict(name="unet", base_channels=32, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8])
    cfg = parse(TrainConfig, dict(steps=40, batch_size=64, ckpt_every=20, log_every=10, precision="bf16",
                                  device="cuda"), "train")
    torch.manual_seed(0)
    r = train(build_model(model, 16, 1), Diffusion("linear", 100, "eps"), images, cfg, tmp_path, fingerprint="g",
              progress=False)
    assert next(r["model"].parameters()).is_cuda
    assert r["history"][-1]["loss"] < r["history"][0]["loss"]
    out = generate(r["ema"], Diffusion("linear", 100, "eps"), 8, (1, 16, 16), steps=10, device=torch.device("cuda"),
                   amp_dtype=torch.bfloat16, progress=False)
    assert out.shape == (8, 1, 16, 16) and torch.isfinite(out).all()
