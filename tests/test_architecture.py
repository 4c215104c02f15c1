"""The import rules of docs/architecture.md: every import of the package (lazy ones inside functions too) goes
to the importer's own part or a lower one, and no chain of imports comes back to where it started."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "doc2atom_jax"


def parts() -> list[tuple[int, str, list[str], list[str]]]:
  """(rank, part, module patterns, excluded patterns) from the table of docs/architecture.md."""
  rows = []
  for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
    m = re.match(r"\|\s*(\d+)\s*\|\s*(\w+)\s*\|([^|]*)\|", line)
    if m:
      cell = m.group(3)
      included, _, excluded = cell.partition("(but")
      rows.append((int(m.group(1)), m.group(2), re.findall(r"`([\w/*]+)`", included),
                   re.findall(r"`([\w/*]+)`", excluded)))
  return rows


def module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE).with_suffix("")
  return "/".join(rel.parts[:-1]) if rel.name == "__init__" else "/".join(rel.parts)


def matches(module: str, pattern: str) -> bool:
  if pattern.endswith("/*"):
    return module == pattern[:-2] or module.startswith(pattern[:-1])
  return module == pattern


def rank_of(module: str, table) -> tuple[int, str] | None:
  found = [(rank, part) for rank, part, patterns, excluded in table
           if any(matches(module, p) for p in patterns) and not any(matches(module, p) for p in excluded)]
  assert len(found) <= 1, f"{module} is in several parts: {found}"
  return found[0] if found else None


def imports(path: pathlib.Path, known: set[str]) -> set[str]:
  """The package modules `path` imports (`from doc2atom_jax.x import y` counts as x/y where y is a module)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "doc2atom_jax":
      base = node.module.split(".")[1:]
      names = ["/".join(base + [a.name]) if "/".join(base + [a.name]) in known else "/".join(base)
               for a in node.names]
    elif isinstance(node, ast.Import):
      names = ["/".join(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "doc2atom_jax"]
    out.update(n for n in names if n)
  return out


def graph() -> dict[str, set[str]]:
  files = {module_name(p): p for p in PACKAGE.rglob("*.py") if module_name(p)}
  return {m: imports(p, set(files)) - {m} for m, p in files.items()}


def test_every_module_has_a_part():
  table = parts()
  assert len(table) >= 8, "the parts table of docs/architecture.md is missing or unreadable"
  missing = sorted(m for m in graph() if rank_of(m, table) is None)
  assert not missing, f"modules in no part of docs/architecture.md: {missing}"


def upward_imports(edges: dict[str, set[str]], table) -> list[str]:
  out = []
  for module, deps in sorted(edges.items()):
    rank, part = rank_of(module, table)
    for dep in sorted(deps):
      dep_rank, dep_part = rank_of(dep, table)
      if dep_rank > rank:
        out.append(f"{module} ({part}) -> {dep} ({dep_part})")
  return out


def cycles(edges: dict[str, set[str]]) -> list[str]:
  """Every back edge of a depth-first walk, as the cycle it closes."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []
  found = []

  def visit(m):
    state[m] = 1
    path.append(m)
    for d in sorted(edges.get(m, ())):
      if state.get(d) == 1:
        found.append(" -> ".join(path[path.index(d):] + [d]))
      elif d not in state:
        visit(d)
    path.pop()
    state[m] = 2

  for m in sorted(edges):
    if m not in state:
      visit(m)
  return found


def test_imports_go_down_or_sideways():
  upward = upward_imports(graph(), parts())
  assert not upward, "imports from a lower part to a higher one:\n" + "\n".join(upward)


def test_no_import_cycle():
  found = cycles(graph())
  assert not found, "import cycles:\n" + "\n".join(found)


def test_the_library_never_imports_the_repository_configs():
  hits = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
          if re.search(r"^\s*(from configs\b|import configs\b)", p.read_text(), re.M)]
  assert not hits, hits


def test_the_checker_catches_an_upward_import_and_a_cycle(tmp_path):
  """The rules can fail: an import from models (runtime) up to eval, a two-module cycle, a lazy import."""
  table = parts()
  assert rank_of("atoms/atomize", table)[1] == "text" and rank_of("atoms/bank", table)[1] == "atoms"
  edges = {"models/base": {"eval/runner"}, "eval/runner": {"models/base"}}
  assert upward_imports(edges, table) == ["models/base (runtime) -> eval/runner (eval)"]
  assert cycles(edges) == ["eval/runner -> models/base -> eval/runner"]
  source = tmp_path / "base.py"
  source.write_text("def f():\n  from doc2atom_jax.eval import runner, metrics\n  import doc2atom_jax.models.config\n")
  assert imports(source, {"eval/runner", "models/config"}) == {"eval/runner", "eval", "models/config"}
