"""What the README tells a user to paste and run: its shell blocks paste as written, and `make clean` removes only
what quickstart and the install made, never compiled sets."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def shell_blocks() -> list[str]:
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_shell_blocks_continue_lines_only_with_a_final_backslash():
    """A comment after `\\` ends the command there: the next line runs on its own (the checkpoints a `make compile`
    example named were never passed, and the configs' hub ids were used)."""
    blocks = shell_blocks()
    assert blocks
    broken = [line for block in blocks for line in block.splitlines() if re.search(r"\\\s+\S", line)]
    assert broken == []


@pytest.mark.skipif(subprocess.run(["which", "make"], capture_output=True).returncode, reason="no make here")
def test_make_clean_keeps_the_compiled_sets_of_the_workspace():
    commands = subprocess.run(["make", "-n", "clean", "WORKSPACE=my-real-sets"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
    removals = [line for line in commands.splitlines() if line.startswith("rm ")]
    assert removals and all("my-real-sets" not in line for line in removals), commands
    assert any("quickstart" in line for line in removals)
