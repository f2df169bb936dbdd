"""The docs tell the truth: every option is in the README with its real default."""

from __future__ import annotations

import dataclasses
import re

from embedserve.config import Config, env_name

from conftest import ROOT

README = (ROOT / "README.md").read_text("utf-8")


def test_every_option_is_documented_with_its_default() -> None:
    for f in dataclasses.fields(Config):
        default = "(none)" if f.default == "" else f.default
        row = (f"| `--{f.name.replace('_', '-')}` | `{env_name(f.name)}` | `{default}` |")
        assert row in README, f"README lacks the row for --{f.name}: {row}"


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text("utf-8")
    command = re.search(r"```sh\n(pip install torch[^\n]+)\n```", README)
    assert command, "README lacks the test command"
    assert command.group(1) in ci
