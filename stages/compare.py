"""Compare timestep strategies run as DVC experiments: FID-vs-iterations and speed-up over the uniform baseline.

    dvc exp run evaluate --queue -S experiment=compare -S 'strategy=uniform,clts_md,curriculum,iddpm,speed,min_snr,mixed_x0'
    dvc queue start && dvc queue status        # wait until all are done
    python -m stages.compare                   # reads the runs from MLflow, writes reports/strategy_comparison.*

Writes a markdown table, the curves and results as JSON, and a PNG of the FID-vs-iterations curves.

Each experiment's `evaluate` run logs `curve_fid_featnet` at every kept checkpoint (eval.curve_samples > 0).
Not a DVC stage: it reads across experiments.
"""
from __future__ import annotations

import argparse
import sys

from stepwise.io import write_json, write_text
from stepwise.speedup import speedup_table, speedups
from stepwise.visualise import plot_fid_curves

from stepwise.tracking import EXPERIMENT, tracking_uri


def collect_curves(client, exp_id: str) -> dict[str, list[tuple[int, float]]]:
    """{strategy: [(step, fid)]} from the newest finished evaluate run of each strategy."""
    curves: dict[str, list] = {}
    for run in client.search_runs([exp_id], "tags.stage = 'evaluate' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"]):
        parent = client.get_run(run.data.tags["mlflow.parentRunId"])
        strategy = parent.data.params.get("comparison.strategy")
        if strategy and strategy not in curves:
            history = client.get_metric_history(run.info.run_id, "curve_fid_featnet")
            if history:
                curves[strategy] = sorted((m.step, m.value) for m in history)
    return curves


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="uniform")
    parser.add_argument("--out", default="reports/strategy_comparison")
    args = parser.parse_args(argv)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(EXPERIMENT)
    curves = collect_curves(client, exp.experiment_id) if exp else {}
    if args.baseline not in curves:
        print(f"stepwise compare: error: no finished run of strategy {args.baseline!r} with an FID curve in "
              f"{tracking_uri()} (found {sorted(curves)}); run the experiments with eval.curve_samples > 0",
              file=sys.stderr)
        return 2
    result = speedups(curves, args.baseline)
    write_json({"curves": curves, "result": result}, f"{args.out}.json")
    write_text(speedup_table(result), f"{args.out}.md")
    plot_fid_curves(curves, result[args.baseline]["final_fid"], f"{args.out}.png")
    print(speedup_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
