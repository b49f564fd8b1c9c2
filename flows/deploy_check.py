"""Check prefect.yaml before `prefect deploy`: one DeploymentConfigError listing every problem found.

    python -m flows.deploy_check                 # checks ./prefect.yaml
    python -m flows.deploy_check path/to/prefect.yaml

What it checks, per deployment: a unique name; `entrypoint` is `path/to/file.py:function`, the file exists (relative to
prefect.yaml's folder) and defines that function decorated with @flow; `parameters` are arguments of that function;
`work_pool.name` is set; `work_pool.job_variables` are variables of a process work pool (`env`, `working_dir`,
`command`, `stream_output`, `name`, `labels`) with the right types, `env` values are strings, and
CUDA_VISIBLE_DEVICES is a comma-separated list of GPU indices or UUIDs; each schedule has exactly one of cron,
interval, rrule, and a valid one. Values templated with `{{ ... }}` are resolved by Prefect at deploy or run time and
are not type-checked here. It reads files only: no Prefect server, no import of the flow module.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

PROCESS_JOB_VARIABLES = {  # prefect.workers.process.ProcessWorker's base job template (Prefect 3.8)
    "name": (str, type(None)),
    "env": dict,
    "labels": dict,
    "command": (str, type(None)),
    "stream_output": bool,
    "working_dir": (str, type(None)),
}
_GPU_ID = r"(-?\d+|GPU-[0-9A-Fa-f-]+|MIG-[\w/-]+)"
CUDA_DEVICES_RE = re.compile(rf"^\s*$|^{_GPU_ID}(\s*,\s*{_GPU_ID})*$")


class DeploymentConfigError(ValueError):
    """prefect.yaml does not describe deployable flows; the message lists every problem."""

    def __init__(self, path, problems: list[str]):
        self.path, self.problems = str(path), list(problems)
        super().__init__(f"{path}: {len(problems)} problem(s) in the deployment config:\n"
                         + "\n".join(f"  - {p}" for p in problems))


def _templated(value) -> bool:
    return isinstance(value, str) and "{{" in value and "}}" in value


def _flow_signature(file: Path, func: str) -> tuple[set[str] | None, bool, bool] | None:
    """(argument names or None when it takes **kwargs, found, decorated with @flow) for `func` in `file`."""
    tree = ast.parse(file.read_text(), filename=str(file))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == func:
            def is_flow(d):
                d = d.func if isinstance(d, ast.Call) else d
                return (isinstance(d, ast.Name) and d.id == "flow") or (isinstance(d, ast.Attribute)
                                                                         and d.attr == "flow")
            a = node.args
            names = {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]}
            return (None if a.kwarg else names), True, any(is_flow(d) for d in node.decorator_list)
    return None


def _check_entrypoint(root: Path, where: str, dep: dict, problems: list[str]) -> None:
    entry = dep.get("entrypoint")
    if not entry:
        problems.append(f"{where}: `entrypoint` is missing (expected 'flows/pipeline.py:pipeline')")
        return
    if not isinstance(entry, str) or entry.count(":") != 1:
        problems.append(f"{where}: entrypoint {entry!r} is not of the form 'path/to/file.py:flow_function'")
        return
    path, func = entry.split(":")
    file = root / path
    if not path.endswith(".py") or not file.is_file():
        problems.append(f"{where}: entrypoint {entry!r}: no such file {file}")
        return
    try:
        found = _flow_signature(file, func)
    except SyntaxError as e:
        problems.append(f"{where}: entrypoint {entry!r}: {file} does not parse ({e.msg}, line {e.lineno})")
        return
    if found is None:
        problems.append(f"{where}: entrypoint {entry!r}: {path} defines no function {func!r}")
        return
    names, _, is_flow = found
    if not is_flow:
        problems.append(f"{where}: entrypoint {entry!r}: {func!r} is not decorated with @flow")
        return
    params = dep.get("parameters") or {}
    if not isinstance(params, dict):
        problems.append(f"{where}: `parameters` must be a mapping, found {type(params).__name__}")
    elif names is not None:
        unknown = sorted(set(params) - names)
        if unknown:
            problems.append(f"{where}: parameters {unknown} are not arguments of {func}() "
                            f"(it takes {sorted(names)})")


def _check_work_pool(where: str, dep: dict, problems: list[str]) -> None:
    pool = dep.get("work_pool")
    if not isinstance(pool, dict) or not pool.get("name"):
        problems.append(f"{where}: `work_pool.name` is missing; name the process work pool the worker polls "
                        f"(e.g. `work_pool: {{name: gpu}}`)")
        return
    jv = pool.get("job_variables") or {}
    if not isinstance(jv, dict):
        problems.append(f"{where}: `work_pool.job_variables` must be a mapping, found {type(jv).__name__}")
        return
    for key, value in jv.items():
        if key not in PROCESS_JOB_VARIABLES:
            problems.append(f"{where}: unknown job variable {key!r} for a process work pool; "
                            f"known: {', '.join(PROCESS_JOB_VARIABLES)}")
        elif not _templated(value) and not isinstance(value, PROCESS_JOB_VARIABLES[key]):
            problems.append(f"{where}: job variable {key!r} has a {type(value).__name__} value ({value!r})")
    env = jv.get("env")
    if isinstance(env, dict):
        for k, v in env.items():
            if v is not None and not isinstance(v, str):
                problems.append(f"{where}: job variable env.{k} must be a string (quote it: {k}: \"{v}\"), "
                                f"found {type(v).__name__}")
        cvd = env.get("CUDA_VISIBLE_DEVICES")
        if isinstance(cvd, str) and not _templated(cvd) and not CUDA_DEVICES_RE.match(cvd):
            problems.append(f"{where}: env.CUDA_VISIBLE_DEVICES={cvd!r} is not a comma-separated list of GPU "
                            f"indices or GPU-/MIG- UUIDs (e.g. \"0\" or \"0,1\")")


def _check_schedules(where: str, dep: dict, problems: list[str]) -> None:
    from prefect.client.schemas.schedules import (
        CronSchedule,
        IntervalSchedule,
        RRuleSchedule,
    )

    schedules = dep.get("schedules") or []
    if not isinstance(schedules, list):
        problems.append(f"{where}: `schedules` must be a list")
        return
    for i, s in enumerate(schedules):
        if not isinstance(s, dict):
            problems.append(f"{where}: schedules[{i}] must be a mapping")
            continue
        kinds = [k for k in ("cron", "interval", "rrule") if s.get(k) is not None]
        if len(kinds) != 1:
            problems.append(f"{where}: schedules[{i}] needs exactly one of cron, interval, rrule (has {kinds or 'none'})")
            continue
        kind, value = kinds[0], s[kinds[0]]
        if _templated(value):
            continue
        cls = {"cron": CronSchedule, "interval": IntervalSchedule, "rrule": RRuleSchedule}[kind]
        extra = {"timezone": s["timezone"]} if s.get("timezone") and kind != "rrule" else {}
        try:
            cls(**{kind: value}, **extra)
        except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, reported as one line
            errors = e.errors() if hasattr(e, "errors") else []
            msg = errors[0]["msg"] if errors else str(e).splitlines()[0]
            problems.append(f"{where}: schedules[{i}] {kind}={value!r}: {msg}")


def check_prefect_yaml(path: str | Path = "prefect.yaml") -> list[str]:
    """Validate a prefect.yaml; return the deployment names, or raise DeploymentConfigError listing the problems."""
    path = Path(path)
    if not path.is_file():
        raise DeploymentConfigError(path, ["file not found"])
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DeploymentConfigError(path, [f"not valid YAML: {e}"]) from None
    if not isinstance(doc, dict):
        raise DeploymentConfigError(path, ["expected a mapping with a `deployments` list"])
    deployments = doc.get("deployments")
    if not isinstance(deployments, list) or not deployments:
        raise DeploymentConfigError(path, ["`deployments` is missing or empty"])
    problems: list[str] = []
    names: list[str] = []
    for i, dep in enumerate(deployments):
        if not isinstance(dep, dict):
            problems.append(f"deployments[{i}]: must be a mapping")
            continue
        name = dep.get("name")
        where = f"deployment {name!r}" if name else f"deployments[{i}]"
        if not name:
            problems.append(f"{where}: `name` is missing")
        elif name in names:
            problems.append(f"{where}: the name is used twice")
        names.append(name)
        _check_entrypoint(path.parent, where, dep, problems)
        _check_work_pool(where, dep, problems)
        _check_schedules(where, dep, problems)
    if problems:
        raise DeploymentConfigError(path, problems)
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default="prefect.yaml")
    args = parser.parse_args(argv)
    try:
        names = check_prefect_yaml(args.path)
    except DeploymentConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.path}: {len(names)} deployment(s) OK: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
