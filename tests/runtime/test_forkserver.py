"""The forkserver module: one-off calls in a preloaded child answer with the protocol's
Done/Failed (one spelling on both sides), a child that dies is named by how it ended, and
importing the module (what the daemon does) pulls in no torch. Real processes throughout."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lastmile.runtime.errors import LoadError
from lastmile.runtime.forkserver import call_in_forkserver


def test_a_call_runs_in_a_child_and_returns_its_value(forkserver):
    pid = call_in_forkserver("os", "getpid")
    assert isinstance(pid, int) and pid != os.getpid()


def test_a_raising_call_is_a_load_error_with_the_text(forkserver):
    with pytest.raises(LoadError, match=r"^math\.sqrt failed: ValueError: math domain error$"):
        call_in_forkserver("math", "sqrt", -1)


def test_a_child_that_dies_is_named_by_how(forkserver):
    with pytest.raises(LoadError, match=r"^os\._exit died \(exit code 3\)$"):
        call_in_forkserver("os", "_exit", 3)


def test_importing_the_forkserver_module_imports_no_torch():
    code = ("import sys, lastmile.runtime.forkserver, lastmile.runtime.runner, lastmile.runtime.pool; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
