"""stepwise: diffusion training that treats timesteps differently.

The library needs torch alone (plus timm for DiT blocks and EMA, tqdm for progress bars); orchestration (DVC,
MLflow, Prefect, Hydra) lives in stages/ and flows/.
"""

__version__ = "0.1.0"
