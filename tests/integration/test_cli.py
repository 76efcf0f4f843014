"""`sserelay serve` refuses bad settings and config with one line naming the field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT


def serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SSERELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", *args],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"SSERELAY_PORT": "eighty"}, "SSERELAY_PORT"),
        ({"SSERELAY_JWT_SECRET": "short"}, "SSERELAY_JWT_SECRET"),
        ({"SSERELAY_LOG_FORMAT": "xml"}, "SSERELAY_LOG_FORMAT"),
        ({"SSERELAY_PING_INTERVAL_S": "0"}, "SSERELAY_PING_INTERVAL_S"),
    ],
)
def test_bad_settings_stop_startup_with_one_line(env: dict[str, str], field: str) -> None:
    result = serve(env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and field in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("providers: [", "not valid YAML"),
        ("- 1\n- 2\n", "must be a mapping"),
        (
            "providers: {}\nmodels: {m: {provider: nope}}\nplans: {p: {}}\ndefault_plan: p\n",
            "models.m.provider",
        ),
        (
            "providers: {s: {kind: simulated}}\nmodels: {}\nplans: {p: {max_tokens: -1}}\n"
            "default_plan: p\n",
            "plans.p.max_tokens",
        ),
        (
            "providers: {s: {kind: openai}}\nmodels: {}\nplans: {p: {}}\ndefault_plan: p\n",
            "providers.s",
        ),
        ("providers: {}\nmodels: {}\nplans: {p: {}}\ndefault_plan: q\n", "default_plan"),
        (
            "providers: {}\nmodels: {}\nplans: {p: {colour: red}}\ndefault_plan: p\n",
            "plans.p.colour",
        ),
    ],
)
def test_bad_config_files_stop_startup_with_one_line(
    tmp_path: Path, yaml_text: str, needle: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    result = serve({"SSERELAY_CONFIG": str(path)})
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and str(path) in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = serve({}, "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read config file" in result.stderr
