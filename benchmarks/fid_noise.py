"""FID noise floor: the spread of fid_featnet over sampling seeds for one model at one sample count.

    python benchmarks/fid_noise.py --model models/unified/model.pt --samples 500 --seeds 0 1 2 3

The strategy comparison (`python -m stages.compare`) reads single FID values off one fixed-noise sample set per
checkpoint; differences smaller than the spread printed here are not resolved by it. Uses the pipeline's own
feature network (`models/featnet.pt`) and the prepared test split; no MLflow, DVC or Prefect needed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout runs without `pip install -e .`
from stepwise.artifacts import load_denoiser
from stepwise.data import load_split
from stepwise.errors import StepwiseError
from stepwise.featnet import load_featnet
from stepwise.fidelity import sample_scores
from stepwise.distributed import resolve_device


def fid_over_seeds(model, diffusion, shape, test_images, featnet, *, samples: int, seeds: list[int], sampler: str,
                   steps: int, device) -> list[float]:
    """fid_featnet of `samples` images drawn with each sampling seed (EMA weights as stored in the model file)."""
    return [sample_scores(model, diffusion, shape, test_images, featnet, samples, device=device, sampler=sampler,
                          steps=steps, seed=seed)["fid_featnet"] for seed in seeds]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/unified/model.pt")
    parser.add_argument("--featnet", default="models/featnet.pt")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--samples", type=int, default=500, help="samples per FID (default: 500, as the curves)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    try:
        if args.samples < 2 or len(args.seeds) < 2:
            raise StepwiseError("need --samples >= 2 and at least two --seeds to measure a spread")
        model, diffusion, shape = load_denoiser(args.model)
        test_images, _, _ = load_split(f"{args.data}/test.pt")
        load_featnet(args.featnet)  # fails clearly before any sampling
    except StepwiseError as e:
        print(f"fid_noise: error: {e}", file=sys.stderr)
        return 2
    device = resolve_device("auto")
    t0 = time.time()
    fids = fid_over_seeds(model.to(device), diffusion.to(device), shape, test_images, args.featnet,
                          samples=args.samples, seeds=args.seeds, sampler=args.sampler, steps=args.steps,
                          device=device)
    result = {"model": args.model, "samples": args.samples, "seeds": args.seeds, "fid_featnet": fids,
              "mean": statistics.mean(fids), "std": statistics.stdev(fids), "range": max(fids) - min(fids),
              "seconds": time.time() - t0, "device": str(device)}
    print(json.dumps(result, indent=1))
    if args.json:
        from stepwise.io import write_json

        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
