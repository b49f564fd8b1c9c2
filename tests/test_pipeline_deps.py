"""stepwise.pipeline_deps and `python -m stages.deps`: each dvc.yaml stage lists exactly its import closure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from stages.deps import main
from stepwise.errors import ConfigError
from stepwise.pipeline_deps import check, code_deps, import_closure, rewrite, stage_module, write

REPO = Path(__file__).resolve().parents[1]

FAKE = {
    "stages/__init__.py": "",
    "stages/run.py": """
        import os
        import torch  # third-party: not a file dep
        from stepwise import core
        from .helper import HELP


        def lazy():
            import importlib

            from stepwise.sub import leaf
            return importlib.import_module("stepwise.dyn"), leaf
        """,
    "stages/helper.py": "import stepwise.dotted.mod\nHELP = 1\n",
    "stages/other.py": "from stepwise import unused\n",
    "stepwise/__init__.py": "",
    "stepwise/core.py": """
        from __future__ import annotations

        from typing import TYPE_CHECKING

        from .util import helper  # a function: only stepwise/util.py

        if TYPE_CHECKING:
            from .typing_only import T
        """,
    "stepwise/util.py": "def helper():\n    return 1\n",
    "stepwise/typing_only.py": "T = int\n",
    "stepwise/dyn.py": "",
    "stepwise/unused.py": "import stepwise.never\n",
    "stepwise/never.py": "",
    "stepwise/sub/__init__.py": "__all__ = ['starred']\n",
    "stepwise/sub/leaf.py": "from .. import util\nfrom ..sub import *\n",
    "stepwise/sub/starred.py": "",
    "stepwise/sub/unused.py": "",
    "stepwise/dotted/mod.py": "",  # a namespace package: no __init__.py
    "flows/__init__.py": "",
    "flows/pipeline.py": "from stages import run\n",
}
RUN_CLOSURE = ["stages/__init__.py", "stages/helper.py", "stages/run.py", "stepwise/__init__.py", "stepwise/core.py",
               "stepwise/dotted/mod.py", "stepwise/dyn.py", "stepwise/sub/__init__.py", "stepwise/sub/leaf.py",
               "stepwise/sub/starred.py", "stepwise/typing_only.py", "stepwise/util.py"]


def fake_repo(root: Path, dvc_yaml: str | None = None) -> Path:
    for rel, text in FAKE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text).lstrip("\n"))
    if dvc_yaml is not None:
        (root / "dvc.yaml").write_text(dvc_yaml)
    return root / "dvc.yaml"


def test_closure_follows_absolute_relative_lazy_and_submodule_imports(tmp_path):
    fake_repo(tmp_path)
    assert import_closure("stages.run", tmp_path) == RUN_CLOSURE
    assert code_deps("stages.run", tmp_path) == RUN_CLOSURE
    assert import_closure("stages.helper", tmp_path) == ["stages/__init__.py", "stages/helper.py",
                                                         "stepwise/__init__.py", "stepwise/dotted/mod.py"]
    assert import_closure("flows.pipeline", tmp_path) == sorted(RUN_CLOSURE + ["flows/__init__.py",
                                                                                "flows/pipeline.py"])
    # a new import anywhere in the closure, even inside a function, joins it
    (tmp_path / "stepwise/util.py").write_text("def helper():\n    from . import never\n")
    assert import_closure("stages.run", tmp_path) == sorted(RUN_CLOSURE + ["stepwise/never.py"])


def test_closure_of_a_module_outside_the_repo_fails(tmp_path):
    fake_repo(tmp_path)
    for name in ("stages.missing", "json", "stepwise.dotted"):  # not a file; not in the repo; a package without main
        with pytest.raises(ConfigError, match=repr(name)):
            import_closure(name, tmp_path)


def test_an_import_of_a_missing_repo_module_is_reported(tmp_path):
    path = fake_repo(tmp_path, "stages:\n  run:\n    cmd: python -m stages.run\n")
    (tmp_path / "stepwise/sub/leaf.py").write_text("def f():\n    from stepwise.moved.away import g\n")
    message = "stepwise/sub/leaf.py imports stepwise.moved.away, but there is no module stepwise.moved in"
    with pytest.raises(ConfigError, match=message):
        import_closure("stages.run", tmp_path)
    assert [p.split(" in /")[0] for p in check(path)] == [f"stage run: {message[:-3]}"]
    assert main(["--dvc-yaml", str(path), "--write"]) == 2


@pytest.mark.parametrize("cmd, module", [
    ("python -m stages.pretrain --data data/prepared --out models/unified", "stages.pretrain"),
    ("python3 -u -X importtime -m stages.finetune --group ${item}", "stages.finetune"),
    ("python -mstages.prune", "stages.prune"),
    ("cd . && python stages/evaluate.py --x 1", "stages.evaluate"),
    ("python -c 'import stages'", None),
    ("dvc exp show", None),
])
def test_stage_module(cmd, module):
    assert stage_module(cmd) == module


DVC_YAML = """\
# The pipeline (comments must survive a rewrite).
vars:
  - x: 1
stages:
  run:  # the stage
    cmd: >-
      python -m stages.run
      --flag a
    deps:
      - data/in  # data stays where it is
      - stages/run.py  # the stage itself
      - stepwise/sub
      - stepwise/gone.py
      - stepwise/unused.py
      - models/${x}.pt
    params:
      - a
    outs:
      - out

  # the foreach stage
  each:
    foreach: [0, 1]
    do:
      cmd: python -m stages.helper --i ${item}
      deps:
        - stages/helper.py
        - data/${item}
      outs:
        - out/${item}

  nodeps:
    cmd: python -m stepwise.util
    outs:
      - z

  shell:
    cmd: cat data/in > y
    deps:
      - data/in
      - stepwise/util.py
    outs:
      - y
"""

REWRITTEN = """\
# The pipeline (comments must survive a rewrite).
vars:
  - x: 1
stages:
  run:  # the stage
    cmd: >-
      python -m stages.run
      --flag a
    deps:
      - data/in  # data stays where it is
      - stages/__init__.py
      - stages/helper.py
      - stages/run.py  # the stage itself
      - stepwise/__init__.py
      - stepwise/core.py
      - stepwise/dotted/mod.py
      - stepwise/dyn.py
      - stepwise/sub/__init__.py
      - stepwise/sub/leaf.py
      - stepwise/sub/starred.py
      - stepwise/typing_only.py
      - stepwise/util.py
      - models/${x}.pt
    params:
      - a
    outs:
      - out

  # the foreach stage
  each:
    foreach: [0, 1]
    do:
      cmd: python -m stages.helper --i ${item}
      deps:
        - stages/__init__.py
        - stages/helper.py
        - stepwise/__init__.py
        - stepwise/dotted/mod.py
        - data/${item}
      outs:
        - out/${item}

  nodeps:
    cmd: python -m stepwise.util
    deps:
      - stepwise/__init__.py
      - stepwise/util.py
    outs:
      - z

  shell:
    cmd: cat data/in > y
    deps:
      - data/in
      - stepwise/util.py
    outs:
      - y
"""


def test_check_reports_missing_stale_and_directory_deps(tmp_path):
    problems = check(fake_repo(tmp_path, DVC_YAML))
    assert problems[:4] == [
        "stage run lists directory stepwise/sub: DVC hashes every file below it (also __pycache__/*.pyc), list the "
        "imported .py files instead",
        "stage run lists stepwise/sub/unused.py (through stepwise/sub) but does not import it",
        "stage run lists stepwise/gone.py, which does not exist",
        "stage run lists stepwise/unused.py but does not import it",
    ]
    missing = [p.split()[3] for p in problems[4:] if p.startswith("stage run imports ")]
    assert missing == [f for f in RUN_CLOSURE if f not in ("stages/run.py",) and not f.startswith("stepwise/sub/")]
    assert [p for p in problems if not p.startswith("stage run ")] == [
        "stage each imports stages/__init__.py but does not list it",
        "stage each imports stepwise/__init__.py but does not list it",
        "stage each imports stepwise/dotted/mod.py but does not list it",
        "stage nodeps imports stepwise/__init__.py but does not list it",
        "stage nodeps imports stepwise/util.py but does not list it",
    ]  # `shell` runs no python module: its deps are its own business


def test_rewrite_keeps_comments_and_non_code_deps(tmp_path):
    path = fake_repo(tmp_path, DVC_YAML)
    text, changed = rewrite(DVC_YAML, tmp_path)
    assert text == REWRITTEN
    assert changed == ["run", "each", "nodeps"]
    assert write(path) == ["run", "each", "nodeps"]
    assert path.read_text() == REWRITTEN and check(path) == []
    assert write(path) == [] and path.read_text() == REWRITTEN  # idempotent


def test_rewrite_keeps_crlf_and_same_indent_lists(tmp_path):
    fake_repo(tmp_path)
    text = "stages:\r\n  each:\r\n    cmd: python -m stages.helper\r\n    deps:\r\n    - data/x\r\n    - stages/helper.py" \
           "\r\n    outs:\r\n    - y\r\n"
    out, changed = rewrite(text, tmp_path)
    assert changed == ["each"]
    assert out == ("stages:\r\n  each:\r\n    cmd: python -m stages.helper\r\n    deps:\r\n    - data/x\r\n"
                   "    - stages/__init__.py\r\n    - stages/helper.py\r\n    - stepwise/__init__.py\r\n"
                   "    - stepwise/dotted/mod.py\r\n    outs:\r\n    - y\r\n")


def test_rewrite_refuses_flow_style_deps(tmp_path):
    fake_repo(tmp_path)
    with pytest.raises(ConfigError, match="block list"):
        rewrite("stages:\n  each:\n    cmd: python -m stages.helper\n    deps: [stages/helper.py]\n", tmp_path)


def test_cli_exit_codes(tmp_path, capsys):
    path = fake_repo(tmp_path, DVC_YAML)
    assert main(["--dvc-yaml", str(path)]) == 1
    assert "stage run lists stepwise/unused.py but does not import it" in capsys.readouterr().out
    assert main(["--dvc-yaml", str(path), "--write"]) == 0
    assert "rewrote the code deps of run, each, nodeps" in capsys.readouterr().out
    assert main(["--dvc-yaml", str(path)]) == 0 and path.read_text() == REWRITTEN
    assert main(["--dvc-yaml", str(tmp_path / "missing.yaml")]) == 2


def test_repo_dvc_yaml_lists_every_imported_file():
    problems = check(REPO / "dvc.yaml")
    assert problems == [], "dvc.yaml code deps drifted; run `python -m stages.deps --write`:\n" + "\n".join(problems)


def test_static_closure_contains_what_importing_each_stage_loads():
    """The static analysis misses no import form the stages use: every repo module that importing a stage module
    really loads is in its closure. Each stage is imported in a forked child of one process that has the third-party
    modules already loaded (it imported every stage, then dropped the repo modules from sys.modules)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    modules = sorted({stage_module((s.get("do") or s)["cmd"]) for s in stages.values()} - {None})
    script = textwrap.dedent("""
        import json, os, sys
        ROOTS = ("stepwise", "stages", "flows")
        for name in sys.argv[1:]:
            __import__(name)
        for name in [n for n in sys.modules if n.split(".")[0] in ROOTS]:
            del sys.modules[name]
        for name in sys.argv[1:]:
            r, w = os.pipe()
            if os.fork() == 0:
                try:
                    __import__(name)
                    files = sorted(os.path.relpath(m.__file__) for n, m in list(sys.modules.items())
                                   if n.split(".")[0] in ROOTS and getattr(m, "__file__", None))
                except BaseException as e:
                    files = f"importing {name} failed: {e!r}"
                os.write(w, json.dumps(files).encode())
                os._exit(0)
            os.close(w)
            with os.fdopen(r) as f:
                print(json.dumps([name, json.loads(f.read())]))
            os.wait()
        """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script, *modules], cwd=REPO, capture_output=True, text=True,
                         env=env, timeout=600, check=True).stdout
    loaded = dict(json.loads(line) for line in out.splitlines())
    assert sorted(loaded) == modules
    for name, files in loaded.items():
        assert isinstance(files, list) and f"{name.replace('.', '/')}.py" in files, files
        assert set(files) <= set(import_closure(name, REPO)), name


def test_stages_deps_does_not_import_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "stages.deps"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "stepwise.pipeline_deps" in imported and "yaml" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}


def test_validation_only_imports_count_only_in_the_config_package(tmp_path):
    """`# validation only` drops an import from the closure inside stepwise/config/ and nowhere else."""
    files = {"stages/__init__.py": "", "stages/s.py": "from stepwise.config import check\nfrom stepwise import other\n",
             "stepwise/__init__.py": "", "stepwise/config/__init__.py": "def check():\n"
             "    from ..heavy import NAMES  # validation only\n    from ..light import X\n",
             "stepwise/heavy.py": "", "stepwise/light.py": "", "stepwise/other.py":
             "def f():\n    from .heavy import NAMES  # validation only\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    closure = import_closure("stages.s", tmp_path)
    assert "stepwise/light.py" in closure and "stepwise/heavy.py" in closure  # still reached through other.py
    (tmp_path / "stepwise/other.py").write_text("X = 1\n")
    assert "stepwise/heavy.py" not in import_closure("stages.s", tmp_path)
