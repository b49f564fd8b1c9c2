"""The code dependencies of each dvc.yaml stage, computed from its module's import closure.

A stage `cmd: python -m stages.X ...` executes every repo file that `stages.X` imports, directly or transitively,
so DVC must list each of them as a dep for an edit to any of them to make the stage stale. `import_closure` finds
those files statically with `ast` (no code is run, so neither torch nor anything else gets imported):

- `import a.b.c` imports a, a.b and a.b.c; `from a.b import c` imports a, a.b and, when c is a submodule, a.b.c;
  relative imports resolve against the importing module's package; `from p import *` also imports the submodules
  that a literal `p.__all__` names; `importlib.import_module("a.b")` / `__import__("a.b")` with a literal name count;
- every import anywhere in a file counts: in functions (lazy imports) and under `if TYPE_CHECKING:` alike;
- importing a module runs its packages' `__init__.py`, so those are in the closure too (`stepwise/__init__.py`,
  `stages/__init__.py`, ...);
- except a *validation-only* import: in the config package (`stepwise/config/`), an import statement whose line
  ends with the comment `# validation only` imports a registry or class only to check a setting's name or
  arguments; the stage's outputs do not depend on that code (a stage that uses it imports it itself), so it is not
  followed. Without this, every stage would list the whole library (e.g. `pretrain` the pruning package) and any
  edit would retrain everything. The marker counts nowhere else;
- only files under the code roots (`stepwise/`, `stages/`, `flows/`) count: third-party imports are DVC's
  params/environment business, not file deps; an import of a module under a code root that has no file is an error
  (the stage would not run, and its deps cannot be known).

Decision: the dep list of a stage (`code_deps`) names files only, never a directory, even when every .py file of a
directory is imported (e.g. `stepwise/pruning`): DVC hashes everything below a directory dep, `__pycache__/*.pyc`
included (the repo's .dvcignore does not exclude them), so the first import after a checkout would make the stage
stale; and a new, unimported file put in that directory would too. `check` still counts a listed directory as
covering the files below it, but reports the directory entry itself as a problem, so that a dvc.yaml passes `check`
exactly when `rewrite` would only reorder its code deps.

A code dep is a deps entry under a code root that ends in `.py` or looks like a directory (no dot in its last
component); everything else (data, models, `${item}` paths, metrics) is left alone.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import tempfile
from pathlib import Path

import yaml

from .errors import ConfigError

CODE_ROOTS = ("stepwise", "stages", "flows")
VALIDATION_ONLY = "# validation only"  # marks an import in the config package that is not a DVC dependency
VALIDATION_ONLY_PACKAGE = "stepwise.config"
_PYTHON = re.compile(r"^python(\d+(\.\d+)*)?$")
_PYTHON_OPTS_WITH_ARG = {"-X", "-W"}
_IMPORT_CALLS = {"__import__", "importlib.import_module", "import_module"}  # with a literal absolute name


# ---- the import closure ----------------------------------------------------------------------------------------

def _module_path(name: str, repo_root: Path, roots) -> tuple[Path | None, bool]:
    """(the file that defines module `name`, whether it is a package); (None, False) if it is not in the repo.

    A directory without `__init__.py` is a namespace package: it exists (its submodules resolve) but has no file."""
    parts = name.split(".")
    if parts[0] not in roots or not all(p.isidentifier() for p in parts):
        return None, False
    base = repo_root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    if base.with_name(parts[-1] + ".py").is_file():
        return base.with_name(parts[-1] + ".py"), False
    return (base, True) if base.is_dir() else (None, False)


def _prefixes(name: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']: importing a module first imports each enclosing package."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _load_yaml(text: str, where):
    """YAML text as data; ConfigError (one line, with line and column) if it is not valid YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None


def _parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as e:
        raise ConfigError(f"{path}: cannot parse it to find its imports: {e}") from None


def _literal_all(path: Path) -> list[str]:
    """The names in a literal module-level `__all__ = [...]` of `path`, else []."""
    for node in _parse(path).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError):
                return []
            return [v for v in value if isinstance(v, str)] if isinstance(value, (list, tuple)) else []
    return []


def _imported_names(path: Path, module: str, is_package: bool, repo_root: Path, roots) -> tuple[set[str], set[str]]:
    """The module names that `path` (module `module`) imports anywhere in the file: (those that must be modules,
    those that are modules only if such a file exists: `from a import f` requires 'a' and may import 'a.f')."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    maybe: set[str] = set()
    lines = path.read_text().splitlines() if module.startswith(VALIDATION_ONLY_PACKAGE) else []
    for node in ast.walk(_parse(path)):
        if lines and isinstance(node, (ast.Import, ast.ImportFrom)) \
                and lines[node.end_lineno - 1].rstrip().endswith(VALIDATION_ONLY):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level > len(parts):
                    continue  # beyond the top-level package: an ImportError at run time, nothing to depend on
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            for alias in node.names:
                if alias.name == "*":
                    init, pkg = _module_path(base, repo_root, roots)
                    if pkg and init is not None and init.is_file():
                        maybe.update(f"{base}.{n}" for n in _literal_all(init))
                else:
                    maybe.add(f"{base}.{alias.name}")
        elif isinstance(node, ast.Call) and _called_name(node.func) in _IMPORT_CALLS and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) \
                and not node.args[0].value.startswith("."):
            names.add(node.args[0].value)
    return names, maybe


def _called_name(func: ast.expr) -> str:
    """`f(...)` -> 'f', `m.f(...)` -> 'm.f', anything else -> ''."""
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return ""


def import_closure(module_name: str, repo_root: str | os.PathLike, roots=CODE_ROOTS) -> list[str]:
    """The sorted repo-relative paths of the .py files that running `python -m module_name` executes (the module,
    its packages' `__init__.py`, a package's `__main__.py`, and all they import, transitively) under `roots`.

    ConfigError if `module_name` is not a module under `roots` of `repo_root`, or if a file of the closure imports
    a module under `roots` that does not exist (the stage would fail with ModuleNotFoundError)."""
    repo_root = Path(repo_root).resolve()
    path, is_package = _module_path(module_name, repo_root, roots)
    if path is None or is_package and not repo_root.joinpath(*module_name.split("."), "__main__.py").is_file():
        raise ConfigError(f"module {module_name!r} is not a runnable module under {'/, '.join(roots)}/ of "
                          f"{repo_root}")
    todo = _prefixes(module_name) + ([f"{module_name}.__main__"] if is_package else [])
    seen: set[str] = set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path, is_package = _module_path(name, repo_root, roots)
        if path is None or not path.is_file():  # not in the repo, not a module, or a namespace package
            continue
        files.add(path)
        required, maybe = _imported_names(path, name, is_package, repo_root, roots)
        for imported in sorted(required):
            for prefix in _prefixes(imported):
                if prefix.split(".")[0] in roots and _module_path(prefix, repo_root, roots)[0] is None:
                    raise ConfigError(f"{path.relative_to(repo_root).as_posix()} imports {imported}, but there is "
                                      f"no module {prefix} in {repo_root}")
        todo.extend(p for imported in required | maybe for p in _prefixes(imported) if p not in seen)
    return sorted(p.relative_to(repo_root).as_posix() for p in files)


def code_deps(stage_module: str, repo_root: str | os.PathLike, roots=CODE_ROOTS) -> list[str]:
    """The code deps a stage running `python -m stage_module` must list: its import closure, one entry per file
    (never a directory: see the module docstring)."""
    return import_closure(stage_module, repo_root, roots)


def stage_module(cmd: str) -> str | None:
    """The module a stage cmd runs: 'python -m stages.X --a b' -> 'stages.X'; 'python stages/x.py' -> 'stages.x';
    None when the cmd does not run python on a module or script."""
    try:
        tokens = shlex.split(cmd)
    except ValueError:
        return None
    for i, token in enumerate(tokens):
        if not _PYTHON.match(os.path.basename(token)):
            continue
        rest = iter(tokens[i + 1:])
        for arg in rest:
            if arg == "-m":
                return next(rest, None)
            if arg.startswith("-m"):
                return arg[2:]
            if arg in _PYTHON_OPTS_WITH_ARG:
                next(rest, None)
            elif not arg.startswith("-"):  # a script
                return arg.removeprefix("./")[:-3].replace("/", ".") if arg.endswith(".py") else None
            elif arg.startswith("-c") or arg == "-":  # code on the command line or stdin
                return None
        return None
    return None


# ---- dvc.yaml -------------------------------------------------------------------------------------------------

def is_code_dep(path, roots=CODE_ROOTS) -> bool:
    """A deps entry that names code: under a code root, and a .py file or a directory (no dot in its last part)."""
    if not isinstance(path, str) or "${" in path:
        return False
    parts = Path(path).parts
    return bool(parts) and parts[0] in roots and (path.endswith(".py") or "." not in parts[-1])


def _dep_path(entry):
    """A deps list entry's path: the string itself, or the single key of a `- path: {options}` mapping."""
    if isinstance(entry, dict) and len(entry) == 1:
        return next(iter(entry))
    return entry


def _stage_body(stage: dict) -> dict:
    """The mapping holding cmd and deps: the stage itself, or its `do:` for a foreach stage."""
    return stage["do"] if isinstance(stage.get("do"), dict) else stage


def _stage_modules(body: dict) -> list[str]:
    cmds = body.get("cmd")
    cmds = cmds if isinstance(cmds, list) else [cmds] if isinstance(cmds, str) else []
    return [m for m in (stage_module(c) for c in cmds) if m]


def _stages(doc) -> dict:
    stages = doc.get("stages") if isinstance(doc, dict) else None
    if not isinstance(stages, dict):
        raise ConfigError("dvc.yaml has no `stages:` mapping")
    return stages


def _stage_closure(body: dict, repo_root: Path, roots) -> list[str] | None:
    """The union of code_deps over the modules the stage's cmd runs; None if it runs no python module."""
    modules = _stage_modules(body)
    if not modules:
        return None
    return sorted({f for m in modules for f in code_deps(m, repo_root, roots)})


def _py_files(directory: Path, repo_root: Path) -> list[str]:
    return sorted(p.relative_to(repo_root).as_posix() for p in directory.rglob("*.py") if "__pycache__" not in p.parts)


def check(dvc_yaml_path: str | os.PathLike, roots=CODE_ROOTS) -> list[str]:
    """One line per problem in the code deps of the stages of `dvc_yaml_path` (its directory is the repo root):
    an imported file the stage does not list, a listed code dep it does not import or that does not exist, a
    listed directory (see the module docstring), a cmd module that is not in the repo."""
    dvc_yaml_path = Path(dvc_yaml_path)
    repo_root = dvc_yaml_path.resolve().parent
    problems = []
    for name, stage in _stages(_load_yaml(dvc_yaml_path.read_text(), dvc_yaml_path)).items():
        body = _stage_body(stage)
        try:
            closure = _stage_closure(body, repo_root, roots)
        except ConfigError as e:
            problems.append(f"stage {name}: {e}")
            continue
        if closure is None:
            continue
        listed = [p for p in map(_dep_path, body.get("deps") or []) if is_code_dep(p, roots)]
        covered = set()
        for dep in listed:
            path = repo_root / dep
            if dep.endswith(".py"):
                if not path.is_file():
                    problems.append(f"stage {name} lists {dep}, which does not exist")
                elif dep not in closure:
                    problems.append(f"stage {name} lists {dep} but does not import it")
                covered.add(dep)
            elif not path.is_dir():
                problems.append(f"stage {name} lists {dep}, which does not exist")
            else:
                problems.append(f"stage {name} lists directory {dep}: DVC hashes every file below it (also "
                                "__pycache__/*.pyc), list the imported .py files instead")
                for f in _py_files(path, repo_root):
                    if f not in closure:
                        problems.append(f"stage {name} lists {f} (through {dep}) but does not import it")
                    covered.add(f)
        problems += [f"stage {name} imports {f} but does not list it" for f in closure if f not in covered]
    return problems


# ---- rewriting dvc.yaml, line by line (PyYAML would drop the comments) ---------------------------------------

def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_content(line: str) -> bool:
    """Neither blank nor a comment-only line."""
    return bool(line.strip()) and not line.lstrip().startswith("#")


def _key_of(line: str) -> str | None:
    """'  name:  # c' -> 'name' for a line that opens a block mapping entry with nothing after the colon."""
    m = re.match(r"^\s*(['\"]?)([^'\"#\s][^'\"#]*?)\1:\s*(#.*)?$", line.rstrip("\r\n"))
    return m.group(2) if m else None


def _is_item(line: str) -> bool:
    return line.lstrip().startswith("-") and line.lstrip()[1:2] in ("", " ", "\r", "\n")


def _block_end(lines: list[str], start: int, stop: int) -> int:
    """The end of the block opened by lines[start]: the next content line indented less deeply (or as deeply, but
    for the `- item`s of a `key:` sequence written at the key's own indent); trailing blank and comment lines are
    left outside."""
    indent, is_key = _indent(lines[start]), _key_of(lines[start]) is not None
    end = start + 1
    for i in range(start + 1, stop):
        if _is_content(lines[i]):
            if _indent(lines[i]) < indent or _indent(lines[i]) == indent and not (is_key and _is_item(lines[i])):
                break
            end = i + 1
    return end


def _children(lines: list[str], start: int, end: int) -> dict[str, int]:
    """The keys of the mapping in lines[start:end] (one indentation level: that of its first content line)."""
    content = [i for i in range(start, end) if _is_content(lines[i])]
    if not content:
        return {}
    indent = _indent(lines[content[0]])
    return {key: i for i in content if _indent(lines[i]) == indent and not _is_item(lines[i])
            and (key := _key_of(lines[i]) or _inline_key(lines[i])) is not None}


def _inline_key(line: str) -> str | None:
    """'  cmd: python ...' -> 'cmd' (a key with an inline value)."""
    m = re.match(r"^\s*([A-Za-z_][\w@.-]*):(\s|$)", line)
    return m.group(1) if m else None


def _deps_items(lines: list[str], start: int, end: int):
    """The items of the deps block lines[start+1:end]: (item indent, [(path, item lines incl. leading comments)])."""
    items, pending, indent = [], [], None
    for i in range(start + 1, end):
        line = lines[i]
        if not _is_content(line):
            pending.append(line)
            continue
        if indent is None:
            if not _is_item(line):
                raise ConfigError(f"dvc.yaml line {i + 1}: expected a `- path` item under `deps:`")
            indent = _indent(line)
        if _indent(line) == indent and _is_item(line):
            items.append([pending + [line], len(pending)])
        elif _indent(line) > indent and items:
            items[-1][0].extend(pending + [line])
        else:
            raise ConfigError(f"dvc.yaml line {i + 1}: unexpected line in a `deps:` list")
        pending = []
    parsed = []
    for item_lines, lead in items:
        text = "".join(ln[indent:] if _indent(ln) >= indent else ln.lstrip(" ") for ln in item_lines[lead:])
        value = yaml.safe_load(text)
        parsed.append((_dep_path(value[0]) if isinstance(value, list) and len(value) == 1 else None, item_lines))
    return indent, parsed


def _newline(line: str) -> str:
    return "\r\n" if line.endswith("\r\n") else "\n"


def _rewrite_deps(lines: list[str], body_start: int, body_end: int, wanted: list[str], roots) -> list[str] | None:
    """The lines of the stage body lines[body_start:body_end] with its code deps replaced by `wanted`; None if
    they are already exactly `wanted`."""
    keys = _children(lines, body_start, body_end)
    if "deps" in keys and _key_of(lines[keys["deps"]]) != "deps":
        raise ConfigError(f"dvc.yaml line {keys['deps'] + 1}: write `deps:` as a block list to rewrite it")
    if "deps" not in keys:
        if not wanted:
            return None
        if "cmd" not in keys:
            raise ConfigError(f"dvc.yaml line {body_start + 1}: a stage body without `cmd:`")
        at = _block_end(lines, keys["cmd"], body_end)
        pad, nl = " " * _indent(lines[keys["cmd"]]), _newline(lines[keys["cmd"]])
        new = [f"{pad}deps:{nl}"] + [f"{pad}  - {p}{nl}" for p in wanted]
        return lines[body_start:at] + new + lines[at:body_end]
    start = keys["deps"]
    end = _block_end(lines, start, body_end)
    indent, items = _deps_items(lines, start, end)
    current = [p for p, _ in items if is_code_dep(p, roots)]
    if current == wanted:
        return None
    nl = _newline(lines[start])
    pad = " " * (indent if indent is not None else _indent(lines[start]) + 2)
    kept = {p: item_lines for p, item_lines in items if is_code_dep(p, roots)}
    code_block = [ln for p in wanted for ln in kept.get(p, [f"{pad}- {p}{nl}"])]
    out, placed = [], False
    for p, item_lines in items:
        if is_code_dep(p, roots):
            if not placed:
                out += code_block
                placed = True
        else:
            out += item_lines
    if not placed:
        out += code_block
    return lines[body_start:start + 1] + out + lines[end:body_end]


def _stage_spans(lines: list[str], names: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (first, end) line range of each stage under the top-level `stages:`."""
    top = [i for i, ln in enumerate(lines) if _is_content(ln) and _indent(ln) == 0]
    start = next((i for i in top if _key_of(lines[i]) == "stages"), None)
    if start is None:
        raise ConfigError("dvc.yaml has no block `stages:` mapping")
    end = _block_end(lines, start, len(lines))
    keys = _children(lines, start + 1, end)
    if list(keys) != names:
        raise ConfigError(f"dvc.yaml: found stages {list(keys)} in the text but {names} when parsed")
    bounds = list(keys.values()) + [end]
    return {name: (bounds[k], _block_end(lines, bounds[k], bounds[k + 1] if k + 1 < len(names) else end))
            for k, name in enumerate(names)}


def _without_code_deps(doc, roots):
    """The parsed dvc.yaml with the code deps of every stage removed (what a rewrite must leave unchanged)."""
    for stage in _stages(doc).values():
        body = _stage_body(stage)
        kept = [d for d in body.pop("deps", None) or [] if not is_code_dep(_dep_path(d), roots)]
        if kept:
            body["deps"] = kept
    return doc


def rewrite(text: str, repo_root: str | os.PathLike, roots=CODE_ROOTS) -> tuple[str, list[str]]:
    """(`text` with each python stage's code deps set to its code_deps, the names of the stages that changed).

    Every line but the code-dep items of `deps:` blocks stays byte for byte. The code deps go, in sorted order,
    where the first one was (else after the other deps; a stage without `deps:` gets one after its `cmd:`); an item
    that stays keeps its own comments (inline, and the comment lines just above it), a dropped one loses them.
    Stages whose cmd runs no python module are left alone. ConfigError if the result would not parse to the same
    pipeline apart from the code deps."""
    repo_root = Path(repo_root).resolve()
    doc = _load_yaml(text, "dvc.yaml")
    stages = _stages(doc)
    lines = text.splitlines(keepends=True)
    spans = _stage_spans(lines, list(stages))
    wanted, changed = {}, []
    for name in reversed(list(stages)):  # bottom up, so the line numbers of the stages above stay valid
        stage = stages[name]
        closure = _stage_closure(_stage_body(stage), repo_root, roots)
        if closure is None:
            continue
        wanted[name] = closure
        first, end = spans[name]
        body_start = first + 1
        if isinstance(stage.get("do"), dict):
            do = _children(lines, first + 1, end).get("do")
            body_start, end = do + 1, _block_end(lines, do, end)
        new = _rewrite_deps(lines, body_start, end, closure, roots)
        if new is not None:
            lines[body_start:end] = new
            changed.append(name)
    out = "".join(lines)
    new_doc = yaml.safe_load(out)
    got = {n: [p for p in map(_dep_path, _stage_body(s).get("deps") or []) if is_code_dep(p, roots)]
           for n, s in _stages(new_doc).items() if n in wanted}
    if got != wanted or _without_code_deps(new_doc, roots) != _without_code_deps(doc, roots):
        raise ConfigError("dvc.yaml: the line-based rewrite changed more than the code deps; fix the deps by hand")
    return out, changed[::-1]


def write(dvc_yaml_path: str | os.PathLike, roots=CODE_ROOTS) -> list[str]:
    """Rewrite the code deps of every stage of `dvc_yaml_path` in place (atomically); the names of changed stages."""
    path = Path(dvc_yaml_path)
    with open(path, newline="") as f:
        text = f.read()
    out, changed = rewrite(text, path.resolve().parent, roots)
    if changed:  # stepwise.io.write_text would import torch; this tool must not
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", newline="") as f:
                f.write(out)
            os.chmod(tmp, path.stat().st_mode & 0o777)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return changed
