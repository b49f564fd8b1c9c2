"""stepwise: diffusion training that treats timesteps differently.

The library needs torch alone for configs, models (UNet), training, sampling, timestep samplers and tracking
hooks (tests/test_imports.py checks it); DiT needs timm, FID needs torch-fidelity, pruning needs torch-pruning, and
each is imported only where used. Orchestration (DVC, MLflow, Prefect, Hydra) lives in stages/ and flows/.
"""

__version__ = "0.1.0"
