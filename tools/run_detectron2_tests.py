#!/usr/bin/env python
"""Run detectron2's own upstream tests against the detectron2 that imports, less a listed set.

  python tools/run_detectron2_tests.py --tests ../shared/vendor/detectron2-v0.6-tests/tests \\
      --deselect tests/detectron2_v0.6_deselected.txt -- -q tests/config tests/modeling ...

The tests folder is copied to --workdir/tests (the vendored copy stays untouched: no caches, no
byte code) and pytest runs there with the arguments after "--" (test paths relative to
--workdir, options), with CI=1 as
upstream's CI runs them (tests that need the COCO data skip themselves). The list file names
the tests left out: one pytest node id per line (a file path leaves out the whole file), then
"  # reason"; blank lines and lines that start with # are ignored. Every listed test must be
one that the selection collects, so a stale entry fails the run, and every other test must
pass (or skip itself).
"""
import argparse
import os
import shutil
import sys

import pytest


def read_list(path):
    """{node id or file path: reason} from the list file."""
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            node, _, reason = line.partition("  # ")
            if not reason.strip():
                raise SystemExit(f"{path}:{n}: no reason given (write 'NODE_ID  # reason')")
            out[node.strip()] = reason.strip()
    return out


class Deselect:
    """Takes the listed node ids out of the collected tests (reported as deselected) and fails
    the session if one of them was not collected."""

    def __init__(self, nodes):
        self.nodes = set(nodes)
        self.found = set()

    def pytest_collection_modifyitems(self, config, items):
        drop = [it for it in items if it.nodeid in self.nodes]
        self.found = {it.nodeid for it in drop}
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = [it for it in items if it.nodeid not in self.nodes]

    def pytest_sessionfinish(self, session, exitstatus):
        stale = sorted(self.nodes - self.found)
        if stale:
            print("\nlisted as left out but not collected (remove or fix these lines):\n  " + "\n  ".join(stale))
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", required=True, help="upstream tests/ folder")
    parser.add_argument("--deselect", required=True, help="list file of the tests left out")
    parser.add_argument("--workdir", default=os.path.join("build", "detectron2-tests"))
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    pytest_args = argv[cut + 1:]  # e.g. -q tests/config tests/test_solver.py

    listed = read_list(args.deselect)
    files = [p for p in listed if "::" not in p]
    nodes = [p for p in listed if "::" in p]
    work = os.path.abspath(args.workdir)
    if os.path.isdir(work):
        shutil.rmtree(work)
    shutil.copytree(args.tests, os.path.join(work, "tests"), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    missing = [p for p in files if not os.path.exists(os.path.join(work, p))]
    if missing:
        raise SystemExit(f"not in {args.tests}: {missing}")
    with open(os.path.join(work, "pytest.ini"), "w") as f:
        f.write("[pytest]\n")  # rootdir and config here, not an ini file of the project above
    os.chdir(work)
    os.environ["CI"] = "1"
    import detectron2

    print(f"detectron2 {detectron2.__version__} from {os.path.dirname(detectron2.__file__)}; "
          f"{len(listed)} entries left out ({args.deselect})")
    argv = ["-c", "pytest.ini", "-rs", *[f"--ignore={p}" for p in files], *pytest_args]
    sys.exit(pytest.main(argv, plugins=[Deselect(nodes)]))


if __name__ == "__main__":
    main()
