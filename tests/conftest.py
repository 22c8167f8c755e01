"""Shared test setup for the nrrdd_ext op tests.

- the ``cuda`` marker; tests carrying it are skipped, with the reason, when no
  CUDA device is visible or when nrrdd_ext was built without its CUDA kernels;
- a ``device`` parametrisation: any test that takes a ``device`` argument runs
  on "cpu" and on "cuda" (the latter marked ``cuda``, so skipped cleanly here);
- fresh random inputs per test: each test seeds torch from a per-session random
  base (printed in the header; set NRRDD_TEST_SEED to replay a session) plus a
  hash of its node id, and the seed is reported when a test fails.
"""
from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

import nrrdd_ext

_ENV_SEED = os.environ.get("NRRDD_TEST_SEED")
SEED_BASE = int(_ENV_SEED) if _ENV_SEED else random.SystemRandom().randrange(2**31)


def cuda_skip_reason():
    """None when the CUDA tests can run, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    if not nrrdd_ext.cuda_kernels_built():
        return "nrrdd_ext was built without its CUDA kernels (nrrdd_ext.cuda_kernels_built() is False)"
    return None


CUDA_SKIP_REASON = cuda_skip_reason()
CUDA_OK = CUDA_SKIP_REASON is None
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda, id="cuda")]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cuda: needs a CUDA device and nrrdd_ext built with its CUDA kernels (skipped cleanly otherwise)")


def pytest_report_header(config):
    return (f"nrrdd_ext: seed base {SEED_BASE} (NRRDD_TEST_SEED={SEED_BASE} replays it); "
            f"CUDA tests: {'run' if CUDA_OK else 'skipped: ' + CUDA_SKIP_REASON}")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


def pytest_collection_modifyitems(config, items):
    if CUDA_OK:
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def node_seed(nodeid: str) -> int:
    return (SEED_BASE + zlib.crc32(nodeid.encode())) % (2**63)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    seed = node_seed(request.node.nodeid)
    torch.manual_seed(seed)  # seeds the CUDA generators too
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        props = dict(item.user_properties)
        if "seed" in props:
            report.sections.append(
                ("nrrdd_ext seed", f"torch.manual_seed({props['seed']}); "
                                   f"replay the session with NRRDD_TEST_SEED={SEED_BASE}"))
