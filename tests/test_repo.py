"""Repository-level checks: CI runs the README's test command, every module imports, the CLI answers."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import baichuan2
from baichuan2.cli import VERBS
from baichuan2.cli import main as cli

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README must open with a bash block holding the two set-up commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_pipeline_and_test_commands():
    main_job, tests = readme_commands()[:2]
    assert main_job.endswith("baichuan2 pipeline")
    assert "pytest" in tests and "pip install torch==2.13.0" in tests


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert readme_commands()[1] in ci


def test_every_module_imports():
    """Catches optional dependencies imported at module level and syntax errors in rarely used files."""
    failures = {}
    for info in pkgutil.walk_packages(baichuan2.__path__, prefix="baichuan2."):
        try:
            importlib.import_module(info.name)
        except Exception as e:  # report all at once
            failures[info.name] = repr(e)
    assert not failures, failures


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help(verb, capsys):
    module = importlib.import_module(VERBS[verb][0])
    assert hasattr(module, "COMMANDS"), f"{VERBS[verb][0]} lacks COMMANDS"
    with pytest.raises(SystemExit) as exit_info:
        cli([verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"baichuan2 {verb}" in out and "usage" in out.lower()


def test_unknown_verb_is_a_clear_error():
    result = subprocess.run([sys.executable, "-m", "baichuan2.cli", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown verb 'frobnicate'" in result.stderr


RECIPE_VERBS = {"pipeline-default.yaml": ("pipeline", None), "scaling-ladder.yaml": ("scaling", "run"),
                "data-default.yaml": ("data", "run"), "rm-default.yaml": ("rm", "train"),
                "ppo-baichuan2.yaml": ("ppo", None), "dpo-safety.yaml": ("dpo", None)}


@pytest.mark.parametrize("name", sorted(RECIPE_VERBS))
def test_shipped_recipes_parse(name):
    """Every non-pretrain recipe validates against its verb's signature (pretrain-* are checked in tests/train)."""
    from baichuan2.cli import recipe_parser

    verb, sub = RECIPE_VERBS[name]
    parser = recipe_parser(verb, sub)
    recipe = REPO / "src" / "baichuan2" / "recipes" / name
    required = {"scaling": ["runs/tokens"], "data": ["in.jsonl"], "rm": ["ckpt", "pairs.jsonl"], "dpo": ["ckpt", "pairs.jsonl"],
                "ppo": ["ckpt", "rm", "prompts.jsonl"]}.get(verb, [])
    cfg = parser.parse_args([f"--config={recipe}", *required])
    assert cfg


def test_every_recipe_is_covered():
    shipped = {p.name for p in (REPO / "src" / "baichuan2" / "recipes").glob("*.yaml")}
    assert shipped - set(RECIPE_VERBS) == {p for p in shipped if p.startswith("pretrain-")}


def test_file_arguments_accept_one_bare_path():
    """`baichuan2 eval ppl CKPT held_out.jsonl` must work: a positional list of files also takes one path."""
    import importlib
    import inspect

    from baichuan2.cli import VERBS, recipe_parser

    for verb, (module, _) in VERBS.items():
        commands = importlib.import_module(module).COMMANDS
        for sub, fn in (commands.items() if isinstance(commands, dict) else [(None, commands)]):
            params = inspect.signature(fn).parameters.values()
            lists = [p for p in params if p.default is inspect.Parameter.empty and "list" in str(p.annotation)]
            for p in lists:
                assert "str | list[str]" in str(p.annotation), f"{verb} {sub}: {p.name} is {p.annotation}"
    cfg = recipe_parser("eval", "ppl").parse_args(["ckpt", "held_out.jsonl"])
    assert cfg.inputs == "held_out.jsonl"


def test_ci_fails_a_test_skipped_for_a_missing_package(tmp_path):
    """tests/conftest.py turns an importorskip of an absent package into a failure when CI=true."""
    (tmp_path / "test_skips.py").write_text('import pytest\n\ndef test_x():\n    pytest.importorskip("no_such_package_b2")\n')
    run = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    assert subprocess.run(run, cwd=REPO, env=env, capture_output=True).returncode == 0
    failed = subprocess.run(run, cwd=REPO, env={**env, "CI": "true"}, capture_output=True, text=True)
    assert failed.returncode == 1 and "skipped for a missing package" in failed.stdout
