"""Python processes for the tests that run several at once, without each importing openai.

A test of processes sharing one ledger starts a few Python processes; each spent most of its
CPU importing openai (about 0.6 s of a 2-core machine's time, per process). These are forked
instead from one server process that imported kimi-budget and openai once
(``multiprocessing``'s forkserver: a single-threaded process, so forking it is safe). Each
child is still a process of its own, with its own ledger connections and background writer: it
gets the test's environment and ``sys.argv``, runs the script as ``__main__``, then the
interpreter's exit handlers (kimi-budget flushes its queued settlements there), and reports
its exit status and output.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import multiprocessing
import os
import runpy
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["PythonProcess"]

_PRELOAD = ["openai", "kimi_budget._client", "kimi_budget.ledger._sqlite"]
_context: Any = None


def _forkserver() -> Any:
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        _context = context
    return _context


def _run(
    script: str | None,
    argv: list[str],
    env: dict[str, str],
    cwd: str | None,
    results: Connection,
) -> None:
    """In the child: what ``python -c script *argv`` (or ``python *argv`` when ``script`` is
    None) would do, output captured."""
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    sys.argv = ["-c", *argv] if script is not None else list(argv)
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if script is not None:
                exec(compile(script, "<string>", "exec"), {"__name__": "__main__"})
            else:
                sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
                runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                status = exc.code or 0
            else:  # sys.exit("message"): the interpreter prints it, and exits with 1
                print(exc.code, file=sys.stderr)
                status = 1
        except BaseException:
            traceback.print_exc()
            status = 1
        try:
            atexit._run_exitfuncs()  # a forked child leaves by os._exit(), which skips them
        except BaseException:
            traceback.print_exc()
            status = status or 1
    results.send((status, out.getvalue(), err.getvalue()))
    results.close()


class PythonProcess:
    """``subprocess.Popen([sys.executable, "-c", script, *argv])``, forked (see above).

    ``PythonProcess.file(path, *argv)`` runs a script file instead, like ``python path``.
    ``env`` replaces the environment (default: the test's own), ``cwd`` the folder.
    """

    def __init__(
        self,
        script: str | None,
        *argv: str,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        context = _forkserver()
        self._results, child_end = context.Pipe(duplex=False)
        self.args = ["-c", script, *argv] if script is not None else list(argv)
        self._process = context.Process(
            target=_run,
            args=(
                script,
                list(argv),
                dict(os.environ if env is None else env),
                None if cwd is None else os.fspath(cwd),
                child_end,
            ),
            daemon=True,
        )
        self._process.start()
        child_end.close()

    @classmethod
    def file(
        cls,
        path: str | os.PathLike[str],
        *argv: str,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> PythonProcess:
        return cls(None, os.fspath(path), *argv, env=env, cwd=cwd)

    def communicate(self, timeout: float) -> subprocess.CompletedProcess[str]:
        """Wait for the child; its exit status, stdout and stderr (``TimeoutExpired`` kills it)."""
        if not self._results.poll(timeout):
            self._process.kill()
            self._process.join()
            raise subprocess.TimeoutExpired(self.args, timeout)
        try:
            status, out, err = self._results.recv()
        except EOFError:  # died without a word: killed, or crashed in C
            status, out, err = None, "", ""
        self._process.join(timeout)
        if status is None:
            status = self._process.exitcode if self._process.exitcode is not None else -1
        return subprocess.CompletedProcess(self.args, status, out, err)
