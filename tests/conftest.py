"""Tests run on CPU; eight host devices let sharding tests build real meshes."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# libtpu lets one process at a time hold its lockfile; the TPU compiler's tests use no chip, so a test run
# may compile beside another compiling process (a bench, a second test run).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
