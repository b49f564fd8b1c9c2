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
import math
import sys

from stepwise.io import write_json, write_text
from stepwise.speedup import speedups
from stepwise.visualise import save_figure

from .common import EXPERIMENT, tracking_uri


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


def table(result: dict) -> str:
    lines = ["| strategy | final FID | iterations to baseline FID | speed-up |", "|---|---|---|---|"]
    for name, r in result.items():
        reach = "never" if r["iters_to_baseline_fid"] is None else f"{r['iters_to_baseline_fid']:.0f}"
        speed = "-" if r["speedup"] is None else ("inf" if math.isinf(r["speedup"]) else f"{r['speedup']:.2f}x")
        lines.append(f"| {name} | {r['final_fid']:.4f} | {reach} | {speed} |")
    base = next(iter(result.values()))
    lines.append(f"\nTarget: the baseline's final FID {base['baseline_final_fid']:.4f}, which the baseline first reached "
                 f"at iteration {base['baseline_iters_to_final_fid']:.0f}; speed-up = that / the strategy's iterations.")
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[tuple[int, float]]], baseline_fid: float, path) -> None:
    """FID-vs-iterations of every strategy (log y) with the baseline's final FID as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(curves.items()):
        steps, fids = zip(*points)
        ax.plot(steps, fids, marker="o", ms=3, label=name)
    ax.axhline(baseline_fid, ls="--", lw=0.8, c="gray", label="baseline final FID")
    ax.set(yscale="log", xlabel="training iteration", ylabel="FID (featnet)", title="FID vs iterations")
    ax.legend(fontsize=8)
    save_figure(fig, path)


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
    write_text(table(result), f"{args.out}.md")
    plot_curves(curves, result[args.baseline]["final_fid"], f"{args.out}.png")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
