"""Shared fixtures.  Real data lives beside the repo in ../shared/data (never copied in);
tests that need it skip cleanly when it is absent.  Override with BAICHUAN2_SHARED_DATA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BAICHUAN2_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under the shared data folder; skips the calling test if it does not exist."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture
def shared_data() -> Path:
    return shared_path()


@pytest.fixture(scope="session")
def real_tokenizer_dir() -> Path:
    return shared_path("baichuan2-tokenizer")


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


MISSING_IMPORT = ("could not import", "No module named", "not installed")


def pytest_sessionfinish(session, exitstatus):
    """In CI (CI=true) a test skipped because a package is missing fails the run: CI installs everything."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reasons = [str(r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longrepr)
               for r in (reporter.stats.get("skipped", []) if reporter else [])]
    missing = [x for x in reasons if any(m in x for m in MISSING_IMPORT)]
    if missing:
        reporter.write_line(f"CI: {len(missing)} test(s) skipped for a missing package: " + "; ".join(sorted(set(missing))),
                            red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
