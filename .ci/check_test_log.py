#!/usr/bin/env python3
"""Reads the output of `cargo test` and fails (exit 1) when the suite could pass vacuously:

- a test binary that ran zero tests;
- a test target of the workspace (the gateway's unit tests, permiso-core's, tests/it) that
  did not run at all;
- an integration-test module (`mod x;` in tests/it/main.rs) or a source file (src/,
  crates/core/src/) with `#[test]` functions of which no test of its crate ran (a dropped
  `mod` line or `#[cfg(test)]` block);
- a test ignored without a reason (`#[ignore = "why"]` prints its reason; a bare `#[ignore]`
  does not).

Usage: check_test_log.py <cargo-test-log> <repo-root>
"""

import pathlib
import re
import sys


def main() -> int:
    log = pathlib.Path(sys.argv[1]).read_text(errors="replace")
    root = pathlib.Path(sys.argv[2])
    problems = []

    # Each "Running <binary>" is followed by "running N tests" and that binary's test lines.
    ran_by = {}  # crate/test-target name ("permiso", "permiso_core", "it") -> test names
    binary = name = None
    for line in log.splitlines():
        m = re.match(r"^\s+Running (.*)$", line)
        if m:
            binary = m.group(1)
            d = re.search(r"deps/(\w+?)-[0-9a-f]+\)?$", binary)
            name = d.group(1) if d else binary
            ran_by.setdefault(name, set())
            continue
        m = re.match(r"^running (\d+) tests?$", line)
        if m and binary is not None and int(m.group(1)) == 0:
            problems.append(f"test binary {binary} ran 0 tests")
        m = re.match(r"^test (\S+) \.\.\. ", line)
        if m and name is not None:
            ran_by[name].add(m.group(1))

    def covered(target: str, prefix: str) -> bool:
        return any(t == prefix or t.startswith(prefix + "::") for t in ran_by.get(target, ()))

    # Every test target of the workspace ran (a crate dropped from default-members would not).
    for target in ("permiso", "permiso_core", "it"):
        if target not in ran_by:
            problems.append(f"test binary of {target} did not run")

    main_rs = (root / "tests/it/main.rs").read_text()
    for module in re.findall(r"^mod (\w+);", main_rs, re.M):
        it_file = root / "tests/it" / f"{module}.rs"
        if "#[test]" in it_file.read_text() and not covered("it", module):
            problems.append(f"integration module tests/it/{module}.rs ran no test")

    # Unit tests beside the code, per crate: a source file with #[test] functions of which
    # none ran (a dropped `mod` line or #[cfg(test)] block).
    for src, target in (("src", "permiso"), ("crates/core/src", "permiso_core")):
        for path in sorted((root / src).rglob("*.rs")):
            if "#[test]" not in path.read_text():
                continue
            rel = path.relative_to(root / src).with_suffix("")
            parts = [p for p in rel.parts if p not in ("lib", "mod", "main")]
            module = "::".join(parts)
            if not covered(target, module) and not (module == "" and ran_by.get(target)):
                problems.append(f"{src}/{path.relative_to(root / src)} has #[test] functions but none ran")

    for name, rest in re.findall(r"^test (\S+) \.\.\. ignored(.*)$", log, re.M):
        reason = rest.lstrip(", ").strip()
        if reason:
            print(f"ignored: {name}: {reason}")
        else:
            problems.append(f"test {name} is ignored without a reason")

    for p in problems:
        print(f"check_test_log: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
