"""Bad settings stop the first stage before any work; consumers check what they load belongs together."""
import sys
import time

import pytest
import yaml
from conftest import pipeline_copy, run

# one rule of each stage's own section (and of the whole file): all must stop `dvc repro` in `prepare`
RULES = [
    ("tdc.num_groups without groups_list", lambda p: p["tdc"].update(num_groups=3), "groups_list"),
    ("finetune train override", lambda p: p["tdc"]["finetune"]["train"].update(lr=-1), "tdc.finetune.train"),
    ("prune budget", lambda p: p["tdc"]["prune"].update(k=1.5), "tdc: prune: k=1.5"),
    ("prune fine-tune sampler", lambda p: p["tdc"]["prune"].update(train={"timestep_sampler": "nope"}),
     "tdc.prune.train"),
    ("profile", lambda p: p["tdc"]["profile"].update(num_timesteps=0), "num_timesteps=0"),
    ("cluster", lambda p: p["tdc"]["cluster"].update(method="kmeans"), "method='kmeans'"),
    ("consistency", lambda p: p["tdc"]["consistency"].update(pairs=[["unified", "nobody"]]), "nobody"),
    ("featnet", lambda p: p["eval"]["featnet"].update(epochs=0), "epochs=0"),
    ("sample steps vs T", lambda p: p["sample"].update(steps=10_000), "sample.steps=10000"),
    ("train lr", lambda p: p["train"].update(lr="abc"), "train.lr='abc'"),
    ("unknown section", lambda p: p.update(trian={"lr": 1}), "unknown top-level section"),
]


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    return pipeline_copy(tmp_path_factory.mktemp("rules") / "repo", ["experiment=ci"])


@pytest.mark.parametrize("name,change,message", RULES, ids=[r[0] for r in RULES])
def test_every_rule_stops_dvc_repro_in_prepare_within_seconds(copy, name, change, message):
    good = (copy / "params.yaml").read_text()
    params = yaml.safe_load(good)
    change(params)
    (copy / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        t0 = time.time()
        proc = run(["dvc", "repro"], copy, check=False, timeout=300)
        seconds = time.time() - t0
    finally:
        (copy / "params.yaml").write_text(good)
    assert proc.returncode != 0, name
    out = proc.stdout + proc.stderr
    assert "stepwise prepare: error:" in out and message in out, out[-2000:]
    assert not (copy / "data/prepared/train.pt").exists()  # nothing was written
    assert seconds < 120  # DVC's own start-up included; the stage fails at config load


def test_evaluate_refuses_a_test_split_of_another_dataset(ci_repro):
    """A 16x16 model scored against 8x8 images (another dataset) fails with one line, writes nothing."""
    dest, env = ci_repro
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["data"].update(image_size=8)
    (dest / "other.yaml").write_text(yaml.safe_dump(params))
    run([sys.executable, "-m", "stages.prepare", "--params", "other.yaml", "--out", "data/other"], dest,
        env={**env, "STEPWISE_PIPELINE_RUN": "other-dataset-test"})  # not under the shared repro's parent run
    proc = run([sys.executable, "-m", "stages.evaluate", "--data", "data/other", "--out", "samples/x", "--metrics",
                "metrics/x.json", "--curve", "plots/x.csv"], dest, check=False, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "stepwise evaluate: error:" in proc.stderr and "different datasets" in proc.stderr
    assert len(proc.stderr.strip().splitlines()[-1]) < 600 and "Traceback" not in proc.stderr
    assert not (dest / "samples/x").exists() and not (dest / "metrics/x.json").exists()
