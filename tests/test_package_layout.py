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
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
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
    assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
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
    "cheers_jax/model/sequence.py": "issue 23 rewrites this module (its docstring cites SPEC.md)",
}


def _tracked_text_files():
  for top in ("cheers_jax", "configs", "launch", ".ci"):
    for folder, _, files in os.walk(os.path.join(REPO, top)):
      if "assets" in folder.split(os.sep) or "__pycache__" in folder:
        continue
      for f in files:
        yield os.path.relpath(os.path.join(folder, f), REPO)
  yield "pyproject.toml"


def test_nothing_cites_a_file_the_repository_lacks():
  bad = []
  for rel in _tracked_text_files():
    if rel in CITES_LEFT_TO_OTHERS:
      continue
    for number, line in enumerate(open(os.path.join(REPO, rel), errors="replace"), 1):
      bad += [f"{rel}:{number}: {name}" for name in NOT_IN_REPO if name in line]
  assert not bad, "cites a file a clone does not have:\n" + "\n".join(bad)
