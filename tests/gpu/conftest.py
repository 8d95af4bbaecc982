"""The GPU checks' switches and their one-line-per-check report.

* Every test under ``tests/gpu/`` carries the ``gpu`` marker (registered in pyproject.toml) and is
  skipped, with the reason, when ``torch.cuda.is_available()`` is false — so the CI suite
  (``python -m pytest -q``, no GPU) collects them and skips them in milliseconds.
* ``GPU_CHECK_ON_CPU=1`` is a development smoke mode for machines without a GPU: the checks run on
  the CPU (Gloo) where that makes sense, with smaller runs, and skip only their CUDA-only
  assertions. It exists to catch errors in the checks themselves; CI never sets it.
* ``GPU_CHECK_RESULTS=<file>`` (``tests/gpu/run.sh`` sets it to ``${OUT:-/tmp}/gpu_check.txt``):
  one line per check — name, PASS/FAIL/SKIP, seconds, key figures — appended and flushed as each
  check ends, so the file survives a timeout; the same line goes to the console.
"""

from __future__ import annotations

import os
import platform
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.gpu.checks import CUDA, RESULTS, SMOKE

HERE = Path(__file__).resolve().parent
SKIP_REASON = ("no CUDA device (torch.cuda.is_available() is False): the GPU checks run on a GPU machine "
               "with `bash tests/gpu/run.sh` (GPU_CHECK_ON_CPU=1 runs a CPU smoke mode for development)")


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one (run tests/gpu/run.sh)")


@pytest.hookimpl(tryfirst=True)  # before `-m gpu` deselects anything
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE not in Path(str(item.path)).resolve().parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if not CUDA and not SMOKE:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture
def figure(request: pytest.FixtureRequest):
    """``figure("acc", "0.9861")``: a key figure for this check's result line (kept in the test
    report's ``user_properties``, so it reaches the line even when the check fails later)."""

    def record(name: str, value: object) -> None:
        request.node.user_properties.append((name, value))
        print(f"{name}={value}")

    return record


# ---------------------------------------------------------------- the result lines

_config: pytest.Config | None = None
_started = time.monotonic()
_checks: dict[str, dict] = {}


def _write(line: str) -> None:
    if RESULTS:
        with open(RESULTS, "a", encoding="utf-8") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())


def _say(config: pytest.Config | None, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter") if config is not None else None
    if reporter is not None:
        reporter.write_line(line)
    _write(line)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}: the GPU check's time is up")


def pytest_sessionstart(session: pytest.Session) -> None:
    if not RESULTS:
        return
    # run.sh's `timeout` sends SIGTERM: unwind like Ctrl-C, so each check's cleanup kills the
    # processes it started (they run in sessions of their own) and the summary line is written
    signal.signal(signal.SIGTERM, _interrupted)
    if CUDA:
        where = f"{torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s), CUDA {torch.version.cuda}"
    else:
        where = "no CUDA" + (": CPU SMOKE MODE (GPU_CHECK_ON_CPU=1), not a GPU check" if SMOKE else "")
    _say(session.config, f"# gpu check {time.strftime('%Y-%m-%d %H:%M:%S')} | torch {torch.__version__} | "
                         f"python {platform.python_version()} | {where}")


def _is_gpu_check(report: pytest.TestReport) -> bool:
    return report.nodeid.replace("\\", "/").startswith("tests/gpu/") or "/tests/gpu/" in report.nodeid


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not RESULTS or not _is_gpu_check(report):
        return
    check = _checks.setdefault(report.nodeid, {"status": "PASS", "seconds": 0.0, "why": "", "ended": False})
    check["seconds"] += report.duration
    if report.skipped and check["status"] == "PASS":
        check["status"] = "SKIP"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        check["why"] = reason.removeprefix("Skipped: ")
    elif report.failed and check["status"] != "FAIL":
        check["status"] = "FAIL"
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        check["why"] = f"{report.when}: " + " ".join(message.split())[:300]
    if report.when != "teardown":
        return
    check["ended"] = True
    figures = " ".join(f"{k}={v}" for k, v in report.user_properties)
    name = report.nodeid.split("::")[-1]
    line = f"{name:<44} {check['status']:<4} {check['seconds']:6.1f}s  {figures}"
    if check["why"]:
        line += f"  [{check['why']}]"
    _say(_config, line)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not RESULTS:
        return
    for nodeid, check in _checks.items():
        if not check["ended"]:  # stopped in the middle (run.sh's timeout)
            check["status"] = "STOP"
            _say(session.config, f"{nodeid.split('::')[-1]:<44} STOP  interrupted after its setup: no result")
    counts = {s: sum(c["status"] == s for c in _checks.values()) for s in ("PASS", "FAIL", "SKIP", "STOP")}
    _say(session.config, f"# done in {time.monotonic() - _started:.0f} s: {counts['PASS']} pass, "
                         f"{counts['FAIL']} fail, {counts['SKIP']} skip, {counts['STOP']} interrupted "
                         f"(pytest exit {int(exitstatus)})")

