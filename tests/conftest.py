"""Tests run on CPU; eight host devices let sharding tests build real meshes.

JAX's persistent compilation cache is on for the session, in a temporary folder (or the one
JAX_COMPILATION_CACHE_DIR names, to keep it across runs): tests that compile the same program through
different jit objects, and the subprocesses tests launch (which inherit the environment), compile it once."""

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
