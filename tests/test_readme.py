"""The README's first screen works as written: its first command, run in a fresh clone with the
machine's stock Python (Debian's, which refuses installs outside a virtualenv), installs the
pinned set and serves the demo; its second command is what CI runs (.ci/run)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
DEMO = "http://127.0.0.1:4180"


def commands() -> list[str]:
    """The README's command blocks, first lines, in order."""
    blocks = (ROOT / "README.md").read_text().split("```sh\n")[1:]
    return [block.split("\n", 1)[0] for block in blocks]


def stock_python_path() -> str:
    """A PATH whose python3 is the system's own (externally managed) one, when there is one."""
    if list(Path("/usr/lib").glob("python3*/EXTERNALLY-MANAGED")):
        return "/usr/bin:/bin"
    return os.environ.get("PATH", "/usr/bin:/bin")


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def status_of(url: str) -> int | None:
    request = urllib.request.Request(url, headers={"Accept": "text/html"})
    opener = urllib.request.build_opener(NoRedirects)
    try:
        with opener.open(request, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_the_second_command_is_what_ci_runs() -> None:
    assert commands()[1] == "bash .ci/run"
    assert (ROOT / ".ci/run").read_text().rstrip().endswith(".venv/bin/python -m pytest")


def test_the_first_command_serves_the_demo_from_a_fresh_clone_on_a_stock_python(
        tmp_path: Path) -> None:
    first = commands()[0]
    assert first.endswith("gateway demo")
    assert port_is_free(4180), "the README's demo needs 127.0.0.1:4180 free"
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    log = tmp_path / "first-command.log"
    with log.open("wb") as out:
        demo = subprocess.Popen(["bash", "-c", first], cwd=clone, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={"PATH": stock_python_path(), "HOME": str(tmp_path)})
    try:
        deadline = time.monotonic() + 300  # pip installs the pinned set from the registry
        while status_of(DEMO + "/oauth2/healthz") != 200:
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        assert status_of(DEMO + "/") == 302  # a browser is sent to the demo IdP
        assert "gateway demo running: open http://127.0.0.1:4180/" in log.read_text()
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(timeout=30) == 0, log.read_text()
