"""`import stepwise` and its core (configs, UNet, training, sampling, samplers, tracking hooks) need torch alone."""
import subprocess
import sys

from conftest import REPO

BLOCKED = ("timm", "tqdm", "torchvision", "torch_fidelity", "torch_pruning", "matplotlib", "mlflow", "dvc",
           "prefect", "hydra", "omegaconf", "PIL", "diffusers")

SCRIPT = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import torch
import stepwise, stepwise.config, stepwise.training, stepwise.sampling, stepwise.models, stepwise.tracking
import stepwise.timestep_samplers, stepwise.diffusion, stepwise.ema, stepwise.progress, stepwise.checkpoint
from stepwise.config import TrainConfig, DiffusionConfig, load_config
from stepwise.diffusion import Diffusion
from stepwise.models import build_model
from stepwise.sampling import generate
from stepwise.training import train
cfg = load_config('params.yaml')
torch.set_num_threads(1)
model = build_model({{'name': 'unet', 'base_channels': 8, 'channel_mult': [1], 'attn_resolutions': []}}, 8, 1)
diffusion = Diffusion(T=20)
images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
tcfg = TrainConfig(steps=2, batch_size=4, log_every=1, ckpt_every=2, device='cpu')
import tempfile
result = train(model, diffusion, images, tcfg, tempfile.mkdtemp(), fingerprint='x', progress=False)
generate(result['ema'], diffusion, 2, (1, 8, 8), steps=2, progress=False)
loaded = sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in BLOCKED)
assert not loaded, loaded
print('ok')
"""


def test_core_library_imports_and_trains_with_torch_alone():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                               "HOME": "/tmp"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
