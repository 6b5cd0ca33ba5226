"""Line counts of the pipeline's wiring in one checkout (issue #25: before/after of the stage refactor).

    python benchmarks/wiring_lines.py [CODE]            # CODE: a checkout, default this one
    python benchmarks/wiring_lines.py CODE --also tasks/run/plan.py ...

The wiring is what connects stages, not what they compute:

- core: tasks/run/spec.py, tasks/run/runner.py, tasks/run/stage.py, tasks/pipelines.py (and each --also file);
- stage tails: the wiring part of every stage module (see `tail_start`);
- flows: flows/*.py;
- CLI: episode2lora/*.py.

A stage module is a module of tasks/ or tasks/sources/ that assigns a stage spec at top level: a
call of a name ending in "Stage" or "Spec" that names its plan/shard/merge or build (one of ROLES),
e.g. `AUGMENT = ShardedStage(..., plan=plan_augment, ...)`.
Its tail runs from the first of these top-level definitions to the end of the file:
  1. the spec assignment itself;
  2. every top-level function the spec's `plan=`, `shard=`, `merge=`, `build=` or `run=` names,
     directly (`plan=plan_augment`) or as the call its lambda makes (`build=lambda s, p, i:
     run_cluster(s, p.cluster, i)`: run_cluster; not the functions of the call's arguments);
  3. every top-level function named `run_<x>` (the plain-call twins);
  4. every top-level class whose name ends in `Plan`, `Shard` or `Spec` and that annotates a parameter or
     the return of a function of 2 or 3.
Everything above the tail (parameters, schema, pure functions) is the stage's own work. The start
of a definition is its first decorator. Counted per file: all lines, and code lines (not blank,
not a comment; docstrings count as code).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROLES = ("plan", "shard", "merge", "build", "run")
"""The spec keywords whose functions are the stage's plan/shard/merge (or its one-step build)."""
CORE = ("tasks/run/spec.py", "tasks/run/runner.py", "tasks/run/stage.py", "tasks/pipelines.py")


def _start(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno] + [d.lineno for d in decorators])


def _is_spec(node: ast.stmt) -> bool:
    """`NAME = <...Stage or ...Spec>(..., plan=..., ...)` at top level: a call that names one of ROLES."""
    value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
    if not isinstance(value, ast.Call):
        return False
    func = value.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return name.endswith(("Stage", "Spec")) and any(k.arg in ROLES for k in value.keywords)


def _called(value: ast.expr) -> str | None:
    """The function a spec keyword names: `plan_augment`, or the one its lambda calls
    (`lambda ...: run_cluster(...)`)."""
    if isinstance(value, ast.Lambda):
        value = value.body.func if isinstance(value.body, ast.Call) else value.body
    return value.id if isinstance(value, ast.Name) else None


def _annotation_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    args = fn.args
    notes = [a.annotation for a in [*args.posonlyargs, *args.args, *args.kwonlyargs] if a.annotation] + [fn.returns]
    return {n.id for note in notes if note is not None for n in ast.walk(note) if isinstance(n, ast.Name)} | {
        n.value for note in notes if note is not None for n in ast.walk(note)
        if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def tail_start(source: str) -> int | None:
    """First line of the module's wiring tail (the rule in the module docstring); None: not a stage module."""
    body = ast.parse(source).body
    specs = [n for n in body if _is_spec(n)]
    if not specs:
        return None
    functions = {n.name: n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    classes = {n.name: n for n in body if isinstance(n, ast.ClassDef)}
    named = {_called(k.value) for spec in specs for k in spec.value.keywords if k.arg in ROLES}
    wiring = [f for name, f in functions.items() if name in named or name.startswith("run_")]
    annotated = {name for fn in wiring for name in _annotation_names(fn)}
    types = [c for name, c in classes.items() if name.endswith(("Plan", "Shard", "Spec")) and name in annotated]
    return min(_start(n) for n in [*specs, *wiring, *types])


def count(lines: list[str]) -> tuple[int, int]:
    """(all lines, code lines: not blank, not a comment)."""
    return len(lines), sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def wiring(code: Path, also: list[str]) -> dict[str, list[tuple[str, int, int]]]:
    """Group -> [(file, all lines, code lines)] for the checkout `code`."""
    groups: dict[str, list[tuple[str, int, int]]] = {"core": [], "stage tails": [], "flows": [], "CLI": []}
    for rel in [*CORE, *also]:
        path = code / rel
        if path.is_file():
            groups["core"].append((rel, *count(path.read_text().splitlines())))
        else:
            groups["core"].append((f"{rel} (missing)", 0, 0))
    for path in sorted([*code.glob("tasks/*.py"), *code.glob("tasks/sources/*.py")]):
        text = path.read_text()
        start = tail_start(text)
        if start is not None:
            rel = str(path.relative_to(code))
            groups["stage tails"].append((f"{rel}:{start}-", *count(text.splitlines()[start - 1:])))
    for group, pattern in (("flows", "flows/*.py"), ("CLI", "episode2lora/*.py")):
        for path in sorted(code.glob(pattern)):
            groups[group].append((str(path.relative_to(code)), *count(path.read_text().splitlines())))
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("code", nargs="?", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout to count (default: this one)")
    parser.add_argument("--also", nargs="*", default=[], help="more core wiring files, relative to CODE")
    args = parser.parse_args(argv)
    groups = wiring(args.code, args.also)
    print(f"wiring line counts of {args.code.resolve()}  (all lines / code lines)")
    total = [0, 0]
    for group, files in groups.items():
        lines, code = sum(f[1] for f in files), sum(f[2] for f in files)
        total[0], total[1] = total[0] + lines, total[1] + code
        print(f"\n{group}: {lines} / {code}  ({len(files)} files)")
        for name, n, c in files:
            print(f"  {n:5d} {c:5d}  {name}")
    print(f"\ntotal: {total[0]} / {total[1]}")
    counted = {f[0] for f in groups["core"]}
    rest = sorted(str(p.relative_to(args.code)) for p in args.code.glob("tasks/run/*.py"))
    print("tasks/run/ not counted (the store and its helpers; add with --also):",
          ", ".join(r for r in rest if r not in counted) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
