"""DVC stage `featnet`: train the dataset's own feature network for offline FID (metric names `*_featnet`).

Metrics: the network's test accuracy, and the real-vs-real FID floor: FID in its feature space between a seeded
subset of eval.num_samples train images and the test split, i.e. what a perfect generator scores at evaluation's
sample count.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict

from stepwise.data import load_split
from stepwise.distributed import resolve_device
from stepwise.featnet import save_featnet, train_featnet
from stepwise.fidelity import real_fid_floor, real_subset
from stepwise.seeding import derive_seed
from stepwise.tracking import stage_run

from .common import ARTIFACTS, add_paths, report_metrics, run_stage

log = logging.getLogger("stepwise.featnet")
FLOOR_STREAM = 1  # derive_seed(eval.featnet.seed, FLOOR_STREAM) draws the floor's train subset


def main(args, config) -> None:
    ecfg = config.eval
    cfg = ecfg.featnet
    images, labels, classes = load_split(f"{args.data}/train.pt")
    test_images, test_labels, _ = load_split(f"{args.data}/test.pt")
    subset = real_subset(len(images), ecfg.num_samples, derive_seed(cfg.seed, FLOOR_STREAM))
    device = resolve_device("auto")
    with stage_run("featnet", config.raw, {"eval.featnet": asdict(cfg), "eval.num_samples": ecfg.num_samples}) as run:
        t0 = time.time()
        net, acc = train_featnet(images, labels, test_images, test_labels, len(classes), cfg, device=device)
        seconds = time.time() - t0
        save_featnet(net.cpu(), args.out, {"test_accuracy": acc, "classes": classes})
        floor = real_fid_floor(images, test_images, subset, extractor="featnet", weights_path=args.out,
                               cuda=device.type == "cuda")
        report_metrics(run, {"featnet_test_accuracy": acc, "featnet_train_seconds": seconds,
                             "fid_featnet_floor": floor}, args.metrics, log)
        run.log_artifact(args.out)


def configure(parser) -> None:
    add_paths(parser, "data", out=ARTIFACTS["featnet"], metrics="metrics/featnet.json")


if __name__ == "__main__":
    run_stage("featnet", main, configure)
