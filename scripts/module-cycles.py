#!/usr/bin/env python3
"""Fails when a crate's modules form a cycle: module A uses B (or something inside B) and B uses A.

Why a script and not `cargo-modules`: that tool needs a nightly-matching rust-analyzer build and
minutes per crate; the rule checked here is simple enough to read off the source.

How it reads a crate: every `.rs` file under `src/` is a module (`a/mod.rs` and `a.rs` are `a`).
A reference is a path in a `use` item (groups expanded) or an inline `crate::`/`super::` path.
A reference from module `x::y::z` to `x::q::r` is an edge between the siblings `y` → `q` under
their common parent `x`: the same picture a reader has of "who depends on whom" at each level.
A parent using its own child (or a child its parent's items) is not an edge between siblings.
Test code (from `#[cfg(test)]` to the end of a file, the project's convention) is left out: a
test may reach anywhere.

Usage: scripts/module-cycles.py [CRATE_DIR ...]   (default: every workspace crate)
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
USE_RE = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", re.M | re.S)
INLINE_RE = re.compile(r"(?<![A-Za-z0-9_:])((?:crate|super|self)(?:::" + IDENT + r")+)")


def module_of(src: Path, file: Path) -> tuple[str, ...]:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts.pop()
    return tuple(parts)


def expand(tree: str) -> list[str]:
    """`a::{b, c::{d, e}}` -> [`a::b`, `a::c::d`, `a::c::e`]."""
    tree = re.sub(r"\s+", "", tree)
    out: list[str] = []

    def walk(prefix: str, text: str) -> None:
        depth, start, items = 0, 0, []
        for i, ch in enumerate(text):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                items.append(text[start:i])
                start = i + 1
        items.append(text[start:])
        for item in filter(None, items):
            if "{" in item:
                head, _, rest = item.partition("{")
                walk(prefix + head, rest[: rest.rfind("}")])
            else:
                out.append(prefix + item.split(" as ")[0])

    walk("", tree)
    return out


def resolve(path: str, here: tuple[str, ...], modules: set[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The module a path points into (its longest prefix that is a module of the crate)."""
    segments = path.split("::")
    if segments[0] == "crate":
        base: list[str] = []
        segments = segments[1:]
    elif segments[0] in ("super", "self"):
        base = list(here)
        while segments and segments[0] in ("super", "self"):
            if segments.pop(0) == "super" and base:
                base.pop()
    elif here + (segments[0],) in modules:
        base = list(here)  # a child module named without `self::` (2018 paths)
    else:
        return None  # an external crate or a name in scope
    target = base + [s for s in segments if s != "*" and s != "self"]
    while tuple(target) not in modules and target:
        target.pop()
    return tuple(target)


def edges(crate: Path) -> dict[tuple[str, ...], set[tuple[str, str]]]:
    src = crate / "src"
    files = sorted(src.rglob("*.rs"))
    modules = {module_of(src, f) for f in files}
    modules |= {m[:i] for m in modules for i in range(len(m))}
    found: dict[tuple[str, ...], set[tuple[str, str]]] = defaultdict(set)
    for file in files:
        here = module_of(src, file)
        text = file.read_text(encoding="utf-8")
        text = text.split("#[cfg(test)]", 1)[0]
        text = re.sub(r"//[^\n]*", "", text)
        paths = [p for tree in USE_RE.findall(text) for p in expand(tree)]
        paths += INLINE_RE.findall(USE_RE.sub("", text))
        for path in paths:
            target = resolve(path, here, modules)
            if target is None:
                continue
            common = 0
            while common < min(len(here), len(target)) and here[common] == target[common]:
                common += 1
            if common < len(here) and common < len(target):
                found[here[:common]].add((here[common], target[common]))
    return found


def cycles(pairs: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in pairs:
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    result: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in list(graph):
        if v not in index:
            strong(v)
    return result


def main(argv: list[str]) -> int:
    crates = [Path(a) for a in argv] or sorted(p.parent for p in ROOT.glob("*/*/Cargo.toml") if (p.parent / "src").is_dir())
    failed = False
    for crate in crates:
        for parent, pairs in sorted(edges(crate).items()):
            for component in cycles(pairs):
                failed = True
                where = "::".join(("crate",) + parent)
                uses = sorted(f"{a} -> {b}" for a, b in pairs if a in component and b in component)
                print(f"{crate.relative_to(ROOT) if crate.is_absolute() else crate}: cycle in {where}: "
                      f"{{{', '.join(component)}}} ({'; '.join(uses)})")
    if not failed:
        print(f"no module cycles in {len(crates)} crates")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
