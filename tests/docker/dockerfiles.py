"""Reading the images' files without Docker: requirement files, Dockerfile instructions, .dockerignore rules."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
ROOT_REQUIREMENTS = REPO / "requirements.txt"
CONVERTER = DOCKER / "requirements-converter.txt"
CONVERTER_TPU = DOCKER / "requirements-converter-tpu.txt"
AIRFLOW = DOCKER / "requirements-airflow.txt"
CONVERTER_DOCKERFILE = DOCKER / "converter.Dockerfile"
AIRFLOW_DOCKERFILE = DOCKER / "airflow.Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


# ------------------------------------------------------------------------------------------ requirements


def requirements(path: Path) -> list[Requirement]:
    """The requirements of a pip requirements file, following `-r` includes (no other options are used)."""
    out: list[Requirement] = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            out += requirements(path.parent / line.split(None, 1)[1])
            continue
        if line.startswith("-"):
            raise ValueError(f"{path.name}: unexpected option line {raw!r} (keep index options in the Dockerfiles)")
        out.append(Requirement(line))
    return out


def pins(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """canonical name -> (version, extras), merging repeated names (e.g. jax[cpu] and jax[tpu])."""
    result: dict[str, tuple[str, frozenset[str]]] = {}
    for req in requirements(path):
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or req.marker is not None or req.url:
            raise ValueError(f"{path.name}: {req} is not an exact pin (name==version)")
        name = canonicalize_name(req.name)
        version, extras = specs[0].version, frozenset(req.extras)
        if name in result:
            if result[name][0] != version:
                raise ValueError(f"{path.name}: {name} pinned to {result[name][0]} and {version}")
            extras |= result[name][1]
        result[name] = (version, extras)
    return result


# ------------------------------------------------------------------------------------------ Dockerfiles


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the logical line (continuations joined), heredoc bodies appended
    line: int

    def json_args(self) -> list[str] | None:
        """The exec form (`["a", "b"]`) of ENTRYPOINT/CMD/SHELL as a list, else None."""
        import json

        text = self.args.strip()
        if text.startswith("["):
            return json.loads(text)
        return None

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        """For COPY/ADD: (`--flag=value` options, the remaining words: sources... destination)."""
        flags, words = {}, []
        for w in shlex.split(self.args):
            if w.startswith("--") and not words:
                k, _, v = w[2:].partition("=")
                flags[k] = v
            else:
                words.append(w)
        return flags, words


def instructions(path: Path) -> list[Instruction]:
    """Logical instructions of a Dockerfile: comments dropped, `\\` continuations joined, heredocs kept."""
    lines = path.read_text().splitlines()
    out: list[Instruction] = []
    i = 0
    while i < len(lines):
        start = i
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [line.rstrip()]
        while parts[-1].endswith("\\"):
            parts[-1] = parts[-1][:-1]
            while i < len(lines) and lines[i].lstrip().startswith("#"):  # comments inside a continuation
                i += 1
            if i >= len(lines):
                break
            parts.append(lines[i].rstrip())
            i += 1
        text = " ".join(p.strip() for p in parts)
        m = re.search(r"<<-?'?\"?(\w+)'?\"?", text)
        if m and text.split(None, 1)[0].upper() in ("RUN", "COPY"):
            end = m.group(1)
            body = []
            while i < len(lines) and lines[i].strip() != end:
                body.append(lines[i])
                i += 1
            i += 1
            text += "\n" + "\n".join(body)
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start + 1))
    return out


def arg_defaults(instrs: list[Instruction]) -> dict[str, str]:
    """`ARG NAME=default` values (the first default given for a name)."""
    out: dict[str, str] = {}
    for ins in instrs:
        if ins.keyword == "ARG" and "=" in ins.args:
            k, v = ins.args.split("=", 1)
            out.setdefault(k.strip(), v.strip())
    return out


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


# -------------------------------------------------------------------------------------------- dockerignore


def _pattern_regex(pattern: str) -> re.Pattern:
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules(path: Path = DOCKERIGNORE) -> list[tuple[bool, re.Pattern]]:
    """(is_exception, regex) per line, in order (Docker: the last matching line decides)."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line[1:] if negate else line
        rules.append((negate, _pattern_regex(line.strip("/"))))
    return rules


def in_build_context(rel: str, rules: list[tuple[bool, re.Pattern]] | None = None) -> bool:
    """Whether a repository path reaches the build context (a rule matching a parent folder applies too)."""
    rules = dockerignore_rules() if rules is None else rules
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    included = True
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            included = negate
    return included


# ------------------------------------------------------------------------------- imports and distributions


@cache
def _files_to_dists() -> dict[str, set[str]]:
    index: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for f in dist.files or ():
            index.setdefault(str(Path(dist.locate_file(f)).resolve()), set()).add(name)
    return index


def dists_of_module(module: str) -> set[str]:
    """Distributions that install `module` (found through this venv's file lists); its top name if absent.

    Looks up the outermost regular package of the dotted name (`jax` for `jax.numpy`; `google.cloud.storage`
    through the `google` and `google.cloud` namespaces), so nothing heavy is imported."""
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            break
        if spec.origin in (None, "namespace"):  # a namespace package: look one level deeper
            continue
        found = _files_to_dists().get(str(Path(spec.origin).resolve()), set())
        if found:
            return found
        break
    return {canonicalize_name(parts[0])}


def imported_modules(path: Path, *, module_level_only: bool = False) -> set[str]:
    """Modules a Python file imports (`from a.b import c` -> `a.b.c`), leaving out `except ImportError:` fallbacks;
    with `module_level_only`, not the imports inside functions (run only when those functions are called)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n) for h in _import_error_handlers(tree) for stmt in h.body for n in ast.walk(stmt)}
    if module_level_only:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                skip |= {id(n) for n in ast.walk(node)}
    modules: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from google.cloud import storage`: the name may be a module of a namespace package.
            modules |= {f"{node.module}.{a.name}" for a in node.names if a.name != "*"} or {node.module}
    return modules


OWN_PACKAGES = {"converters", "operators", "ckptflow_ui", "ckptflow_plugin"}


def third_party(modules: set[str]) -> set[str]:
    return {
        m for m in modules if m.split(".")[0] not in OWN_PACKAGES and m.split(".")[0] not in sys.stdlib_module_names
    }


def third_party_imports(folder: Path) -> dict[str, set[str]]:
    """Every non-stdlib, non-project module imported anywhere under `folder` (also inside functions) -> its
    distributions."""
    modules: set[str] = set()
    for path in folder.rglob("*.py"):
        modules |= imported_modules(path)
    return {m: dists_of_module(m) for m in sorted(third_party(modules))}


def _import_error_handlers(tree: ast.AST) -> list[ast.ExceptHandler]:
    names = {"ImportError", "ModuleNotFoundError"}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            caught = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            if any(isinstance(c, ast.Name) and c.id in names for c in caught):
                out.append(node)
    return out


def closure(top: dict[str, tuple[str, frozenset[str]]]) -> set[str]:
    """The distributions a set of pins installs, from this venv's metadata (extras and markers evaluated)."""
    seen: set[str] = set()
    todo = [(name, set(extras)) for name, (_, extras) in top.items()]
    while todo:
        name, extras = todo.pop()
        key = name
        if key in seen and not extras:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (libtpu, the Google provider): counted, not followed
        for raw in requires:
            req = Requirement(raw)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                dep = canonicalize_name(req.name)
                if dep not in seen or req.extras:
                    todo.append((dep, set(req.extras)))
    return seen
