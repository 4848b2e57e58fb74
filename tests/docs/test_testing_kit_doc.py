"""docs/TESTING_KIT.md (the rivervalley.testing guide) stays true: its example test file passes in a fresh
pytest process (the plugin loaded from the entry point), and the failure messages it quotes are the ones
scripts/testing_kit_bugs.py prints today."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # tests/docs/ -> the repository root
GUIDE = (ROOT / "docs" / "TESTING_KIT.md").read_text()
pytest_plugins = ["pytester"]


def test_guide_example_test_file_passes(pytester):
    block = re.search(r"<!-- testing-kit-example:start -->\n```python\n(.*?)```", GUIDE, re.S)
    assert block, "docs/TESTING_KIT.md lost its testing-kit example block"
    pytester.makepyfile(test_my_merges=block.group(1))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2)


def test_guide_quotes_the_messages_the_checks_give():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "testing_kit_bugs.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    quoted = re.findall(r"^  (AssertionError: .*)$", GUIDE, re.M)
    assert len(quoted) == 4
    for line in quoted:
        assert line in out, f"docs/TESTING_KIT.md quotes a message the kit no longer gives: {line[:120]}"
