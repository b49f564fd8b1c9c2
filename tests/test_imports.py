"""`import stepwise` and its core (config classes, UNet, training, sampling, samplers, tracking hooks) need torch alone.

(`stepwise.config.load_config` of a whole params.yaml also validates the `tdc.prune` section against the pruning
registries, which need torch-pruning: the pipeline's own dependency.)"""
import subprocess
import sys

from conftest import REPO

BLOCKED = ("timm", "tqdm", "torchvision", "torch_fidelity", "torch_pruning", "matplotlib", "mlflow", "dvc",
           "prefect", "hydra", "omegaconf", "PIL", "diffusers")

SCRIPT = f"""
import importlib.abc, importlib.machinery, sys
BLOCKED = {BLOCKED!r}
class Refuse(importlib.abc.Loader):  # probing for the package finds it; importing it fails
    def create_module(self, spec):
        raise ImportError('blocked: ' + spec.name)
    def exec_module(self, module):
        pass
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, Refuse())
sys.meta_path.insert(0, Block())
import torch
import stepwise, stepwise.config, stepwise.training, stepwise.sampling, stepwise.models, stepwise.tracking
import stepwise.timestep_samplers, stepwise.diffusion, stepwise.ema, stepwise.progress, stepwise.checkpoint
from stepwise.config import TrainConfig, DiffusionConfig, SampleConfig, parse
from stepwise.diffusion import Diffusion
from stepwise.models import build_model
from stepwise.sampling import generate
from stepwise.training import train
parse(DiffusionConfig, {{'prediction': 'mixed_x0'}}, 'diffusion'); parse(SampleConfig, {{}}, 'sample')
torch.set_num_threads(1)
model = build_model({{'name': 'unet', 'base_channels': 8, 'channel_mult': [1], 'attn_resolutions': []}}, 8, 1)
diffusion = Diffusion(T=20)
images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
tcfg = TrainConfig(steps=2, batch_size=4, log_every=1, ckpt_every=2, device='cpu')
import tempfile
result = train(model, diffusion, images, tcfg, tempfile.mkdtemp(), fingerprint='x', progress=False)
generate(result['ema'], diffusion, 2, (1, 8, 8), steps=2, progress=False)
loaded = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED and sys.modules[m] is not None)
assert not loaded, loaded
print('ok')
"""


def test_core_library_imports_and_trains_with_torch_alone():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                               "HOME": "/tmp"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
