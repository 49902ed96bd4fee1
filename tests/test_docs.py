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


SYNOPSES = ["toolkit synth", "toolkit compile", "toolkit inspect", "toolkit validate", "toolkit demo", "toolkit eval",
            "toolkit data download", "perf run", "perf compare", "perf traffic", "perf profile", "perf buckets",
            "perf serve"]


@pytest.mark.parametrize("command", SYNOPSES)
def test_readme_synopses_name_every_option_the_command_takes(command):
    """The command's synopses in the README (`toolkit eval --task T ...` in backticks) hold every option its --help
    lists, so a user reading the table sees all of them."""
    from toolkit.cli import main

    group, *names = command.split()
    cmd = main.commands["perf"] if group == "perf" else main
    for name in names:
        cmd = cmd.commands[name]
    readme = (ROOT / "README.md").read_text().replace("\n", " ")
    synopses = " ".join(re.findall(rf"`{command} [^`]*`", readme))
    assert synopses, f"no synopsis of {command}"
    missing = [p.opts[0] for p in cmd.params if p.opts[0].startswith("--")
               and not any(re.search(rf"{re.escape(o)}\b", synopses) for o in p.opts + p.secondary_opts)]
    assert missing == [], f"{command}: {missing}"


@pytest.mark.parametrize("config", sorted((ROOT / "build_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_build_config_says_how_to_get_an_offline_stand_in_of_its_checkpoint(config):
    from toolkit.config import load_build_config

    cfg = load_build_config(config)
    shape = re.search(r"-(0\.6b|4b|8b)-", cfg.name).group(1)
    assert f"`toolkit synth --task {cfg.task} --shape {shape} DIR`, then --checkpoint DIR" in config.read_text()
