"""Tests run on CPU; eight host devices let sharding tests build real meshes.

JAX's persistent compilation cache is on for the session, in a temporary folder (or the one
JAX_COMPILATION_CACHE_DIR names, to keep it across runs): tests that compile the same program through
different jit objects, and the subprocesses tests launch (which inherit the environment), compile it once.

The suite runs on pytest-xdist workers (pyproject's addopts: `-n auto --dist loadscope`), a module to a
worker so module fixtures are built once; the workers share the compile cache through the environment."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# libtpu lets one process at a time hold its lockfile; the TPU compiler's tests use no chip, so a test run
# may compile beside another compiling process (a bench, a second test run).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

_SESSION_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="jax-compilation-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _SESSION_CACHE or "")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # tests compile many small programs
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


# The modules that take longest, in that order: sent to the workers first so that none is left alone with
# a long module at the end (measured on 2 cores; the rest follow in collection order).
SLOWEST_FIRST = ("test_distill.py", "test_digits.py", "test_resume.py", "test_distill_cli.py", "test_targets.py",
                 "test_model.py", "test_remote_paths.py", "test_ternary_matmul.py")
GIB_PER_WORKER = 6  # a worker's peak resident memory is about 3.5 GB (the digits run's subprocesses beside it)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core, as many as memory holds, at most 8 (each has 8 host devices)."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(len(os.sched_getaffinity(0)), int(memory_gib // GIB_PER_WORKER), 8))
