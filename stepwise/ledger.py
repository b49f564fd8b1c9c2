"""Run summaries that survive the machine: one small JSON per finished comparison run, committed under reports/.

A strategy comparison is many training runs (strategies x training seeds), more than one sitting may finish. Each
`evaluate` run with an FID curve writes `reports/runs/<strategy>/seed<k>-<yardstick>-<version>.json` under the
repo root (`$DVC_ROOT` for `dvc exp run --queue/--temp`, so a queued experiment writes into the user's checkout):
its FID curve, bootstrap replicates of each point over samples, the settings that define the run and the
yardstick it was measured with. Commit them as they finish; `python -m stages.compare` aggregates every summary
found there (and the MLflow runs), so a comparison is built up over several sittings.

The yardstick is what makes two FIDs comparable: the feature network (its file's sha256), the number of samples,
the sampler, its steps and eta, and the noise seed. Runs with different yardsticks are never put in one table.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import DataError
from .io import write_json

SUMMARY_FORMAT = "stepwise-run-summary/1"
RUNS_DIR = Path("reports") / "runs"
YARDSTICK_KEYS = ("featnet_sha256", "num_samples", "sampler", "steps", "eta", "noise_seed")


def yardstick(featnet_sha256: str, num_samples: int, scfg) -> dict:
    """The evaluation settings that make two FIDs comparable (scfg: the SampleConfig the samples were drawn with)."""
    return {"featnet_sha256": featnet_sha256, "num_samples": int(num_samples), "sampler": scfg.sampler,
            "steps": int(scfg.steps), "eta": scfg.eta, "noise_seed": int(scfg.seed)}


def yardstick_id(ys: dict) -> str:
    """A short, stable name of a yardstick."""
    return hashlib.sha256(json.dumps(ys, sort_keys=True).encode()).hexdigest()[:8]


def runs_root() -> Path:
    """<repo root>/reports/runs: $DVC_ROOT when DVC runs the stage (also in a queued experiment), else the cwd."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()) / RUNS_DIR


def write_summary(*, strategy: str, seed: int, curve: list[dict], ys: dict, settings: dict, version: str,
                  experiment: str = "", root: Path | None = None) -> Path:
    """Write one run's summary atomically; `curve` rows are {'step', 'fid', 'fid_replicates': [...]}."""
    path = (root or runs_root()) / strategy / f"seed{seed}-{yardstick_id(ys)}-{version[:8]}.json"
    write_json({"format": SUMMARY_FORMAT, "strategy": strategy, "seed": int(seed), "experiment": experiment,
                "version": version, "yardstick": ys, "settings": settings, "curve": curve}, path)
    return path


def read_summaries(root: Path | None = None) -> list[dict]:
    """Every run summary under `root` (default reports/runs), each with its 'path'; DataError naming a bad file."""
    root = root or RUNS_DIR
    out = []
    for path in sorted(Path(root).rglob("*.json")):
        try:
            obj = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a run summary ({type(e).__name__}); delete it or restore it from git") \
                from None
        if not isinstance(obj, dict) or obj.get("format") != SUMMARY_FORMAT:
            raise DataError(f"{path}: not a {SUMMARY_FORMAT} file; delete it or restore it from git")
        try:
            curve = [{"step": int(r["step"]), "fid": float(r["fid"]),
                      "fid_replicates": [float(v) for v in r.get("fid_replicates", [])]} for r in obj["curve"]]
            out.append({"path": str(path), "strategy": str(obj["strategy"]), "seed": int(obj["seed"]),
                        "yardstick": dict(obj["yardstick"]), "curve": curve, "version": str(obj.get("version", "")),
                        "settings": obj.get("settings", {}), "experiment": obj.get("experiment", "")})
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: malformed run summary ({type(e).__name__}: {e}); delete it or restore it from "
                            "git") from None
    return out
