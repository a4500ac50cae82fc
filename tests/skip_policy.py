"""No silent skips: a pytest plugin (loaded by conftest.py) that lists every skipped test at the end
and, with GLM_IMAGE_ONNX_NO_SILENT_SKIPS=1 (scripts/test.sh and scripts/test_providers.sh set it, so
CI does), fails the run when a test was skipped that ALLOWED does not name. A missing extra or tool
would otherwise turn failures into skips and leave CI green."""

from __future__ import annotations

import os

import pytest

# Node id prefix -> why skipping it is right in the main environment.
ALLOWED = {
    "tests/test_providers_accelerated.py": "runs in .venv-cann / .venv-cuda (scripts/test_providers.sh), "
                                           "where onnxruntime-cann / onnxruntime-gpu replace onnxruntime",
}
_skipped: list[tuple[str, str]] = []


def _allowed(nodeid: str) -> bool:
    return os.environ.get("GLM_IMAGE_ONNX_EXPECT_EP") is None and any(nodeid.startswith(p) for p in ALLOWED)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _skipped:
        return
    tr = terminalreporter
    tr.section("skipped tests")
    for prefix, why in ALLOWED.items():
        count = sum(n.startswith(prefix) and _allowed(n) for n, _ in _skipped)
        if count:
            tr.write_line(f"allowed: {count} in {prefix}: {why}")
    for nodeid, reason in _skipped:
        if not _allowed(nodeid):
            tr.write_line(f"NOT ALLOWED: {nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    silent = [n for n, _ in _skipped if not _allowed(n)]
    if silent and os.environ.get("GLM_IMAGE_ONNX_NO_SILENT_SKIPS") == "1" and exitstatus == 0:
        session.exitstatus = 1
        print(f"\n{len(silent)} test(s) skipped that tests/skip_policy.py does not allow "
              "(GLM_IMAGE_ONNX_NO_SILENT_SKIPS=1): " + ", ".join(silent))
