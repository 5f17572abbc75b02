"""The package's shape: no import cycles (module- or function-level imports alike), and nothing in it
depends on the repository's top-level config folder (an installed package has none)."""

from __future__ import annotations

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cheers_jax")


def _modules() -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        name = "cheers_jax." + os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def _imports(path: str) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def test_no_import_cycles():
  modules = _modules()
  graph = {m: {n for n in _imports(p) if n in modules and n != m} for m, p in modules.items()}
  done: set[str] = set()

  def visit(m: str, path: list[str]) -> None:
    assert m not in path, f"import cycle: {' -> '.join(path[path.index(m) :] + [m])}"
    if m in done:
      return
    for n in sorted(graph[m]):
      visit(n, path + [m])
    done.add(m)

  for m in sorted(graph):
    visit(m, [])


def test_nothing_depends_on_the_config_folder():
  for name, path in _modules().items():
    imported = {n.split(".")[0] for n in _imports(path)}
    assert "configs" not in imported, name
    assert "configs" not in open(path).read(), f"{name} names the repository's config folder"


REPO = os.path.dirname(PACKAGE)
# Files of the project's development setup that a clone does not have: code and docs must not cite them.
NOT_IN_REPO = ("SPEC.md", 'SPEC "', "DESIGN.md", "PAPER_RESULTS", "shared/oracle", "shared/reference", "/work/")
# Files other open issues rewrite (left to them, so the branches merge): path -> why it is still allowed.
CITES_LEFT_TO_OTHERS = {
  "tests/test_package_layout.py": "names them to look for them",
}


def _tracked_text_files():
  for top in ("cheers_jax", "configs", "launch", ".ci", "tests", "docs"):
    for folder, _, files in os.walk(os.path.join(REPO, top)):
      if {"assets", "fixtures", "__pycache__"} & set(folder.split(os.sep)):
        continue
      for f in files:
        yield os.path.relpath(os.path.join(folder, f), REPO)
  yield "pyproject.toml"
  yield "README.md"


def test_nothing_cites_a_file_the_repository_lacks():
  bad = []
  for rel in _tracked_text_files():
    if rel in CITES_LEFT_TO_OTHERS:
      continue
    for number, line in enumerate(open(os.path.join(REPO, rel), errors="replace"), 1):
      bad += [f"{rel}:{number}: {name}" for name in NOT_IN_REPO if name in line]
  assert not bad, "cites a file a clone does not have:\n" + "\n".join(bad)


# ---- imports at the top ---------------------------------------------------------------------------------
# A module's header is its dependency list: function-level imports only for heavy optional packages, each
# with a short reason on its line.
HEAVY_OPTIONAL = {
  "tensorflow": "TFDS sources and the TensorBoard writer only",
  "tensorflow_datasets": "the TFDS source only",
  "pandas": "the evaluation's TSV files only",
  "matplotlib": "the sweep's plot only",
  "clu": "the metric writer; it imports TensorFlow",
}
# Modules other open issues rewrite: their function-level imports are left to them (at most this many;
# heavy optional ones not counted). Remove an entry when its issue has landed.
LEFT_TO_OTHERS: dict[str, tuple[int, str]] = {}  # none: the issues that owned such modules have merged


def _function_level_imports(path: str) -> list[tuple[int, str]]:
  tree = ast.parse(open(path).read())
  found = {}
  for fn in ast.walk(tree):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for node in ast.walk(fn):
        if isinstance(node, ast.Import):
          found[node.lineno] = node.names[0].name
        elif isinstance(node, ast.ImportFrom):
          found[node.lineno] = "." * node.level + (node.module or "")
  return sorted(found.items())


def test_imports_are_at_the_top():
  unexplained, over, total = [], [], 0
  for name, path in sorted(_modules().items()):
    rel = os.path.relpath(path, REPO)
    source = open(path).read().splitlines()
    counted = []
    for line, module in _function_level_imports(path):
      total += 1
      if module.split(".")[0] in HEAVY_OPTIONAL:
        if "#" not in source[line - 1] and rel not in LEFT_TO_OTHERS:
          unexplained.append(f"{rel}:{line}: {module} (a heavy optional package: say why on its line)")
        continue
      counted.append(f"{rel}:{line}: {module}")
    limit = LEFT_TO_OTHERS.get(rel, (0, ""))[0]
    if len(counted) > limit:
      (over if limit else unexplained).extend(counted)
  assert not unexplained, "function-level imports (move them to the module's top):\n" + "\n".join(unexplained)
  assert not over, "more function-level imports than LEFT_TO_OTHERS allows:\n" + "\n".join(over)
  assert total < 80, total  # 137 on 2026-12-03 before issue 24
