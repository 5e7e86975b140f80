"""ops/provide-llama-server.sh: the lookup order and its clear failures."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from zenow.servers import LLAMA_CPP_PYTHON_VERSION
from zenow.servers._binary import LLAMA_SERVER_BUILD

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "ops" / "provide-llama-server.sh"


def provide(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)


def test_the_script_builds_the_version_zenow_looks_for():
    pinned = re.search(r'LLAMA_CPP_PYTHON_VERSION="\$\{LLAMA_CPP_PYTHON_VERSION:-([\d.]+)\}"', SCRIPT.read_text())
    assert pinned and pinned.group(1) == LLAMA_CPP_PYTHON_VERSION
    build = re.search(r'LLAMA_SERVER_BUILD="(\w+)"', SCRIPT.read_text())
    assert build and build.group(1) == LLAMA_SERVER_BUILD


def test_a_configured_binary_wins(tmp_path):
    binary = tmp_path / "my-llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    result = provide({"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ZENOW_LLAMA_SERVER": str(binary)})
    assert result.returncode == 0 and result.stdout.strip() == str(binary)


def test_a_binary_on_path_is_used(tmp_path):
    (tmp_path / "bin").mkdir()
    binary = tmp_path / "bin" / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    result = provide({"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.stdout.strip() == str(binary)


def test_a_missing_build_tool_is_named(tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("bash", "mktemp", "rm", "dirname", "cat"):  # a PATH with no cmake and no compiler
        found = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        if found:
            os.symlink(found, tools / tool)
    result = provide({"PATH": str(tools), "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode != 0
    assert "cmake is missing" in result.stderr
