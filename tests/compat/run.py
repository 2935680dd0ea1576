"""Run the openai SDK's own tests, for the installed openai version, against our clients.

    python tests/compat/run.py --install-deps      # once: the SDK tests' dev dependencies
    python tests/compat/run.py [--stock] [PATH ...] [-- PYTEST ARGS]

Fetches the SDK's source distribution from the package index (``pip download --no-binary
:all: --no-deps openai==<installed>``), unpacks it into ``.compat-cache/`` and runs pytest
there with ``-p kb_compat_plugin`` (which swaps ``openai.OpenAI``/``openai.AsyncOpenAI`` for
ours). ``--stock`` runs the same tests against the SDK's own clients, for comparison. The
default paths are ``tests/test_client.py tests/test_streaming.py tests/lib/chat``. The SDK
tests' own dev dependencies (those these paths import, from the SDK's pyproject) must be
installed: ``--install-deps`` installs them into this interpreter. Intended differences are
listed, with their reasons, in ``kb_compat_plugin.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = ROOT / ".compat-cache"
DEFAULT_PATHS = ("tests/test_client.py", "tests/test_streaming.py", "tests/lib/chat")
# What the default paths import from the SDK's dev dependencies (its pyproject), plus the
# aiohttp extra its client tests are parametrized over.
SDK_TEST_DEPENDENCIES = (
    "pytest",
    "pytest-asyncio",
    "inline-snapshot",
    "respx",
    "trio",
    "dirty-equals",
    "time-machine",
    "nest_asyncio",
    "rich",
)


def sdk_source(openai_version: str) -> Path:
    """The unpacked sdist of ``openai==openai_version`` (downloaded once)."""
    target = CACHE / f"openai-{openai_version}"
    if (target / "tests").is_dir():
        return target
    CACHE.mkdir(exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-binary",
            ":all:",
            "--no-deps",
            f"openai=={openai_version}",
            "-d",
            str(CACHE),
        ],
        check=True,
    )
    [archive] = CACHE.glob(f"openai-{openai_version}.tar.gz")
    with tarfile.open(archive) as tar:
        wanted = (["tests"], ["pyproject.toml"])
        members = [m for m in tar.getmembers() if m.name.split("/")[1:2] in wanted]
        tar.extractall(CACHE, members=members, filter="data")
    return target


def install_dependencies(openai_version: str) -> int:
    extra = f"openai[aiohttp]=={openai_version}"
    command = [sys.executable, "-m", "pip", "install", "-q", extra, *SDK_TEST_DEPENDENCIES]
    return subprocess.run(command).returncode


def main(argv: list[str]) -> int:
    if argv == ["--install-deps"]:
        return install_dependencies(version("openai"))
    stock = "--stock" in argv
    argv = [arg for arg in argv if arg != "--stock"]
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    openai_version = version("openai")
    source = sdk_source(openai_version)
    command = [
        sys.executable,
        "-m",
        "pytest",
        *(argv or DEFAULT_PATHS),
        "-o",
        "addopts=--tb=short",
        "-p",
        "no:cacheprovider",
        "-q",
        "-p",
        "kb_compat_sdist",
    ]
    if not stock:
        command += ["-p", "kb_compat_plugin"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), str(HERE), str(ROOT)])}
    print(
        f"openai {openai_version}, {'stock clients' if stock else 'kimi-budget clients'}:",
        " ".join(command[3:]),
        flush=True,
    )
    return subprocess.run([*command, *extra], cwd=source, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
