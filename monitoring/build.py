"""Write every generated monitoring file from monitoring/, or check they are current.

python -m monitoring.build          # write
python -m monitoring.build --check  # exit 1 if any committed output is stale
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import packaging, rule_tests, rules
from .dashboards import DASHBOARDS
from .render import to_json, to_yaml, to_yaml_documents

ROOT = Path(__file__).resolve().parent.parent
RULES = "rules/step-runner.rules.yml"
RULE_TESTS = "rules/tests"


def outputs() -> dict[str, str]:
    """Repository-relative path to the exact text it must hold."""
    rule_file = rules.rule_file()
    files = {RULES: to_yaml(rule_file)}
    for group, tests in rule_tests.test_files().items():
        files[f"{RULE_TESTS}/{group}.test.yml"] = to_yaml(tests)
    boards = {name: build() for name, build in DASHBOARDS.items()}
    for name, board in boards.items():
        files[f"dashboards/{name}"] = to_json(board)
    files["dashboards/provisioning/dashboards.yml"] = to_yaml(
        packaging.dashboard_provider(), comment=packaging.PROVIDER_COMMENT
    )
    files["dashboards/provisioning/datasource.yml"] = to_yaml(
        packaging.datasource(), comment=packaging.DATASOURCE_COMMENT
    )
    files["deploy/kubernetes/monitoring/prometheusrule.yaml"] = to_yaml(
        packaging.prometheus_rule(rule_file)
    )
    configmaps = [packaging.dashboard_configmap(n, b) for n, b in boards.items()]
    files["deploy/kubernetes/monitoring/dashboards-configmap.yaml"] = to_yaml_documents(configmaps)
    return files


def orphans(root: Path, expected: Sequence[str]) -> list[str]:
    """Generated-looking files no longer produced (a renamed or removed rule group)."""
    found = (p.relative_to(root).as_posix() for p in (root / RULE_TESTS).glob("*.test.yml"))
    return sorted(set(found) - set(expected))


def stale(root: Path) -> list[str]:
    problems = []
    files = outputs()
    for rel, text in files.items():
        path = root / rel
        if not path.exists():
            problems.append(f"{rel}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{rel}: stale")
    problems += [f"{rel}: no longer generated" for rel in orphans(root, list(files))]
    return problems


def write(root: Path) -> list[str]:
    files = outputs()
    changed = []
    for rel, text in files.items():
        path = root / rel
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        changed.append(rel)
    for rel in orphans(root, list(files)):
        (root / rel).unlink()
        changed.append(f"{rel} (removed)")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.build", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if any output is stale")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check:
        problems = stale(args.root)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run: python -m monitoring.build", file=sys.stderr)
        return 1 if problems else 0
    for rel in write(args.root):
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
