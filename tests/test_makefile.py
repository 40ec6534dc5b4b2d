"""`make setup` picks the torch build that fits the machine, and its index probe costs seconds."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def torch_choice(tmp_path: Path, index: str, gpu: bool) -> tuple[str, float]:
    """What the Makefile chooses, with a stand-in nvidia-smi that works or fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nexit {0 if gpu else 1}\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    started = time.perf_counter()
    done = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "torch-choice", f"TORCH_CPU_INDEX={index}"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), time.perf_counter() - started


@pytest.fixture
def index_server(tmp_path):
    """A local stand-in for PyTorch's CPU index."""
    (tmp_path / "site" / "whl" / "cpu").mkdir(parents=True)
    (tmp_path / "site" / "whl" / "cpu" / "index.html").write_text("<a href='torch/'>torch</a>\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    server.shutdown()
    server.server_close()


def test_a_gpu_machine_takes_the_cuda_build(tmp_path, index_server):
    assert torch_choice(tmp_path, index_server, gpu=True)[0] == "cuda"


def test_a_cpu_machine_takes_the_cpu_index_when_it_answers(tmp_path, index_server):
    assert torch_choice(tmp_path, index_server, gpu=False)[0] == "cpu-index"


def test_an_unreachable_cpu_index_falls_back_to_the_configured_one(tmp_path):
    with socket.socket() as closed:  # a port nothing listens on: refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    choice, seconds = torch_choice(tmp_path, f"http://127.0.0.1:{port}/whl/cpu", gpu=False)
    assert choice == "plain" and seconds < 5


def test_a_silent_cpu_index_costs_seconds_not_minutes(tmp_path):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        choice, seconds = torch_choice(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}/whl/cpu", gpu=False)
    assert choice == "plain" and 4.5 < seconds < 15


def test_setup_installs_the_chosen_build_and_prints_it():
    done = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "setup", "VENV=/nonexistent/v", "TORCH_CPU_INDEX=http://127.0.0.1:9/whl/cpu"],
        capture_output=True, text=True, timeout=60,
    )
    text = done.stdout
    assert done.returncode == 0, done.stderr
    assert "cpu-index) /nonexistent/v/bin/pip install torch==2.13.0 --index-url http://127.0.0.1:9/whl/cpu ;;" in text
    assert "*) echo \"http://127.0.0.1:9/whl/cpu did not answer: torch from the configured index\"; " \
           "/nonexistent/v/bin/pip install torch==2.13.0 ;;" in text
    assert "print('installed: torch', torch.__version__, 'cuda ' + torch.version.cuda if torch.version.cuda else 'cpu')" in text
