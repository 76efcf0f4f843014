"""The README's commands run as written: `make run` from the Quickstart serves, and the
curl section, copied into a shell, streams, resumes and streams directly against it.
(`make test` is the command running this very test.)"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.servers import free_port, wait_http
from tests.support import ROOT

README = (ROOT / "README.md").read_text()


def _block_after(marker: str) -> str:
    start = README.index(marker)
    match = re.search(r"```sh\n(.*?)```", README[start:], re.DOTALL)
    assert match is not None, marker
    return match.group(1)


@pytest.fixture(scope="module")
def make_run() -> Iterator[int]:
    quickstart = _block_after("## Quickstart")
    command = next(line for line in quickstart.splitlines() if line.startswith("make run"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSERELAY_")} | {
        "SSERELAY_PORT": str(port)
    }
    proc = subprocess.Popen(
        command.split("#")[0].split(),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}", timeout=120, alive=lambda: proc.poll() is None)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="needs curl, jq")
def test_the_curl_section_runs_as_written(make_run: int) -> None:
    script = _block_after("With curl").replace("localhost:8000", f"localhost:{make_run}")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path("/tmp"),
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # live stream, the resumed one, and the direct one: three complete streams
    assert out.count("event: done") == 3, out[-2000:]
    resumed = out.split("event: done", 1)[1]
    first_id = re.search(r"^id: (\d+)$", resumed, re.MULTILINE)
    assert first_id is not None and first_id.group(1) == "8"
