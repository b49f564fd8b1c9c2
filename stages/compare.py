"""Compare timestep strategies over training seeds: mean FID curves with bands, speed-ups with 95 % intervals.

    dvc exp run evaluate --queue -S experiment=compare -S 'strategy=uniform,clts_md,min_snr' -S 'train.seed=0,1,2'
    OMP_NUM_THREADS=1 dvc queue start -j 2     # each finished run writes reports/runs/<strategy>/seed<k>-*.json
    python -m stages.compare                   # -> reports/strategy_comparison.{md,json,png}
    python -m stages.compare --missing         # the queue commands of the (strategy, seed) runs not done yet

Reads the run summaries under reports/runs (commit them as they finish: a comparison can be built up over several
sittings) and the MLflow `evaluate` runs that carry a yardstick; refuses to mix runs measured with different
yardsticks. Not a DVC stage: it reads across experiments.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from stepwise.comparison import comparison_table, compare, missing_runs, queue_commands
from stepwise.errors import StepwiseError
from stepwise.io import write_json, write_text
from stepwise.ledger import RUNS_DIR, read_summaries, yardstick_id
from stepwise.tracking import EXPERIMENT, tracking_uri
from stepwise.visualise import plot_fid_curves

log = logging.getLogger("stepwise.compare")
REPO = Path(__file__).resolve().parents[1]


def mlflow_runs(ledger: list[dict]) -> list[dict]:
    """Runs of finished `evaluate` stages with an FID curve and a yardstick tag, not already in the ledger."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    known = {(r["strategy"], r["seed"], r["version"][:8]) for r in ledger}
    runs = []
    for run in client.search_runs([exp.experiment_id], "tags.stage = 'evaluate' and attributes.status = 'FINISHED' "
                                  "and tags.`stepwise.yardstick` != ''", order_by=["attributes.start_time ASC"]):
        parent = client.get_run(run.data.tags["mlflow.parentRunId"])
        strategy, seed = parent.data.params.get("comparison.strategy"), parent.data.params.get("train.seed")
        history = client.get_metric_history(run.info.run_id, "curve_fid_featnet")
        version = parent.data.tags.get("stepwise.version", "")
        if strategy and seed is not None and history and (strategy, int(seed), version[:8]) not in known:
            runs.append({"strategy": strategy, "seed": int(seed), "version": version, "path": run.info.run_id,
                         "yardstick": json.loads(run.data.tags["stepwise.yardstick"]),
                         "curve": [{"step": m.step, "fid": m.value, "fid_replicates": []}
                                   for m in sorted(history, key=lambda m: m.step)]})
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="uniform")
    parser.add_argument("--runs", default=str(RUNS_DIR), help="run summaries (default: %(default)s)")
    parser.add_argument("--source", choices=("both", "ledger", "mlflow"), default="both")
    parser.add_argument("--yardstick", help="only the runs of this yardstick id (when several are present)")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--out", default="reports/strategy_comparison")
    parser.add_argument("--missing", action="store_true", help="print the `dvc exp run --queue` commands of the "
                        "strategies (conf/strategy) and --seeds without a run summary yet, and exit")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="with --missing (default: 0 1 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        runs = read_summaries(args.runs) if args.source != "mlflow" else []
        if args.source != "ledger":
            runs += mlflow_runs(runs)
        if args.yardstick:
            runs = [r for r in runs if yardstick_id(r["yardstick"]) == args.yardstick]
        if args.missing:
            strategies = sorted(p.stem for p in (REPO / "conf" / "strategy").glob("*.yaml"))
            print("\n".join(queue_commands(missing_runs(runs, strategies, args.seeds))) or "nothing missing")
            return 0
        if not runs:
            raise StepwiseError(f"no comparison runs found in {args.runs} or {tracking_uri()}; run the experiments "
                                "with experiment=compare (eval.curve_samples > 0)")
        result = compare(runs, args.baseline, n_boot=args.boot)
    except StepwiseError as e:
        print(f"stepwise compare: error: {e}", file=sys.stderr)
        return 2
    result["runs"] = sorted(r["path"] for r in runs)
    write_json(result, f"{args.out}.json")
    write_text(comparison_table(result), f"{args.out}.md")
    plot_fid_curves(result, f"{args.out}.png")
    print(comparison_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
