"""Accelerators we compile for without having them: TPU slices and H100 hosts, by name.

`python -m train.bench --target v5p-64` and `python -m flux_jax.memory_report --target h100` compile
the real program with the accelerator's own compiler on any machine ("deviceless" ahead-of-time
compilation: libtpu for TPUs, XLA's GPU pipeline through ptxas for H100s), over compile-only devices
of the named topology: build a mesh of `target_devices(target)`, lower under `jax.set_mesh(mesh)`
(its abstract mesh also tells GPU kernels which GPU they compile for), compile. The figures are the
compiler's buffer assignment, not a run; no GPU autotuning happens without a GPU (GEMM
configurations are untuned).

The compilers come with the `tpu` extra (libtpu, which leaves CPU use alone) and the `cuda` extra (the
CUDA plugin; set JAX_PLATFORMS=cpu before Python starts on a machine without a GPU).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies

from flux_jax.io.errors import UserError
from flux_jax.sharding import MESH_AXES

SPECS = Path(__file__).parent / "target_specs"


class TargetError(UserError, ValueError):
    """A target that is unknown, or whose compiler is not installed."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice or host: `chips` devices of one kind, each with `hbm_bytes` of memory and a dense
    bf16 peak of `peak_flops` (the vendor's data sheet)."""

    name: str
    platform: str  # "tpu" or "cuda"
    topology: str  # libtpu's topology name, or "<partitions>x<hosts>x<devices per host>" for cuda
    chips: int
    hbm_bytes: int
    peak_flops: float
    spec: str | None = None  # a GpuTargetConfigProto file in target_specs/ (cuda)

    @property
    def extra(self) -> str:
        return "tpu" if self.platform == "tpu" else "cuda"

    def describe(self) -> str:
        return (f"{self.name}: {self.chips} x {self.kind_name}, {self.hbm_bytes / 1e9:.1f} GB "
                f"({self.hbm_bytes / 2**30:.1f} GiB) each")

    @property
    def kind_name(self) -> str:
        return f"TPU {self.topology.split(':')[0]}" if self.platform == "tpu" else _spec_field(self.spec, "name")


def _spec_field(spec: str, field: str) -> str:
    """One field of a GPU device description in target_specs/."""
    return re.search(rf'^\s*{field}: "?([^"\n]+)"?$', (SPECS / spec).read_text(), re.MULTILINE).group(1)


_H100_BYTES = int(_spec_field("h100_sxm.txtpb", "device_memory_size"))
_A100_BYTES = int(_spec_field("a100_sxm.txtpb", "device_memory_size"))

TARGETS: dict[str, Target] = {t.name: t for t in (
    # TPU slices: v5e and v6e names count chips, v5p names count TensorCores (two per chip); "v5p-1"
    # is one v5p chip, for single-chip figures such as memory_report's.
    Target("v5e-1", "tpu", "v5e:1x1", 1, 16 * 10**9, 197e12),
    Target("v5e-8", "tpu", "v5e:2x4", 8, 16 * 10**9, 197e12),
    Target("v6e-1", "tpu", "v6e:1x1", 1, 32 * 10**9, 918e12),
    Target("v6e-8", "tpu", "v6e:2x4", 8, 32 * 10**9, 918e12),
    Target("v5p-1", "tpu", "v5p:1x1x1", 1, 95 * 10**9, 459e12),  # one chip: a compile target, not a sold slice
    Target("v5p-8", "tpu", "v5p:2x2x1", 4, 95 * 10**9, 459e12),
    Target("v5p-64", "tpu", "v5p:4x4x2", 32, 95 * 10**9, 459e12),
    # H100 SXM 80GB: memory as XLA's device description gives it (79.1 GiB usable), 989 TFLOP/s dense bf16.
    Target("h100", "cuda", "1x1x1", 1, _H100_BYTES, 989e12, spec="h100_sxm.txtpb"),
    Target("8xh100", "cuda", "1x1x8", 8, _H100_BYTES, 989e12, spec="h100_sxm.txtpb"),
    # A100 SXM 80GB (sm_80: the Triton kernel's GPUs), 312 TFLOP/s dense bf16.
    Target("a100", "cuda", "1x1x1", 1, _A100_BYTES, 312e12, spec="a100_sxm.txtpb"),
)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    return TARGETS[name]


def compiler_installed(target: Target) -> bool:
    module = "libtpu" if target.platform == "tpu" else "jax_cuda12_plugin"
    return importlib.util.find_spec(module) is not None


def target_devices(target: Target) -> list:
    """The target's compile-only devices (nothing is allocated on them; they need not exist)."""
    if not compiler_installed(target):
        raise TargetError(f"compiling for {target.name} needs the {target.platform.upper()} compiler: "
                          f'pip install -e ".[{target.extra}]"')
    if target.platform == "tpu":
        single_host = {"chips_per_host_bounds": (1, 1, 1)} if target.chips == 1 else {}
        return list(topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **single_host).devices)
    spec = (SPECS / target.spec).read_text()
    try:
        return list(topologies.get_topology_desc(platform="cuda", topology_name="", target_config=spec,
                                                 topology=target.topology).devices)
    except (NotImplementedError, RuntimeError) as err:  # the plugin failed at cuInit: no GPU here
        raise TargetError(f"the CUDA plugin did not start ({err}); on a machine without a GPU, set "
                          f"JAX_PLATFORMS=cpu before Python starts to compile for {target.name}") from None


def out_of_memory(err: Exception) -> str | None:
    """The compiler's own words when it refused a program for lack of device memory (TPU compilers
    refuse at compile time), else None."""
    text = str(err)
    return text.splitlines()[0] if "RESOURCE_EXHAUSTED" in text else None


def headroom(used_bytes: int, target: Target) -> str:
    """'fits with N% headroom' or 'does not fit by X GB' against one chip's HBM."""
    free = target.hbm_bytes - used_bytes
    if free >= 0:
        return f"fits with {100 * free / target.hbm_bytes:.0f}% headroom"
    return f"does not fit by {-free / 1e9:.2f} GB"


def one_chip_mesh(target: Target) -> jax.sharding.Mesh:
    """A mesh of one compile-only chip of `target` (every axis of size 1)."""
    return jax.make_mesh((1,) * len(MESH_AXES), MESH_AXES, devices=target_devices(target)[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def abstract_state(module: nnx.Module, sharding=None):
    """`module`'s state as ShapeDtypeStructs (placed by `sharding`): what a compile needs of its weights."""
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding), nnx.state(module))


def compile_abstract(modules: list[nnx.Module], fn, inputs, sharding=None):
    """`fn(*modules, *inputs)` compiled for the backend or mesh in context from abstract modules (shapes
    only: nothing is allocated); every weight is an argument, used or not, as in a loaded model."""
    graphdefs = [nnx.graphdef(m) for m in modules]

    def program(states, *args):
        return fn(*[nnx.merge(g, s) for g, s in zip(graphdefs, states)], *args)

    states = [abstract_state(m, sharding) for m in modules]
    return jax.jit(program, keep_unused=True).lower(states, *inputs).compile()


def tree_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) in `tree`."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def total_bytes(stats) -> int:
    """Arguments + outputs (less those aliased to donated arguments) + temporaries of a compiled program."""
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)
