"""How the tests that run whole commands start them: a clean environment, the output in one string."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: Where this Python's scripts (pytest, gpushare) are.
BIN = Path(sys.executable).parent
#: Variables that would steer the plugin, pytest, Ollama or CUDA in a child from outside the test.
STEERING = ("GPUSHARE_", "PYTEST_", "OLLAMA_", "CUDA_")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment less the steering variables, with BIN first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(STEERING)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env | extra


def run_command(
    args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; what it printed on stdout and stderr is in ``.stdout``."""
    return subprocess.run(
        args,
        cwd=cwd,
        env=env,
        check=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
