"""Time the packed ternary kernel against the XLA backend and a bf16 dense matmul, in one run.

    python -m pallas_kernels.bench                          # FLUX.1-dev layer shapes, M in {1, 16, 64, 256, 4608}
    python -m pallas_kernels.bench --m 1 16 --layers qkv mlp_out --repeats 20

On a Hopper or newer GPU both GPU kernels run (Mosaic GPU and Triton), on older GPUs Triton, on TPU
the Mosaic one; the weight-stream column is the packed bytes read per second as a fraction of the
device's peak memory bandwidth (from the table below).
On CPU the kernel can only run in interpret mode: the run checks that everything works and says so,
and its timings are no performance figure.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.packing import pack_ternary, to_tiled
from pallas_kernels.ternary_matmul import ternary_matmul

H = 3072
LAYERS = {  # FLUX.1-dev's ternary layer shapes (K, N)
    "qkv": (H, 3 * H),
    "proj": (H, H),
    "mlp_in": (H, 4 * H),
    "mlp_out": (4 * H, H),
    "modulation": (H, 6 * H),
    "linear1": (H, 7 * H),
    "linear2": (5 * H, H),
}
# Peak memory bandwidth in bytes/s by `device_kind` (vendor data sheets).
PEAK_BANDWIDTH = {
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H100 NVL": 3.9e12,
    "NVIDIA H200": 4.8e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
    "NVIDIA A100-SXM4-40GB": 1.555e12,
    "NVIDIA A100 80GB PCIe": 1.935e12,
    "NVIDIA L4": 0.3e12,
    "NVIDIA GeForce RTX 4090": 1.008e12,
    "TPU v4": 1.2e12,
    "TPU v5 lite": 0.819e12,
    "TPU v5e": 0.819e12,
    "TPU v5p": 2.765e12,
    "TPU v6 lite": 1.64e12,
    "TPU v6e": 1.64e12,
}


def kernel_backends(device) -> list[str]:
    """The kernels this device runs; on CPU, Triton's in interpret mode."""
    if device.platform == "tpu":
        return ["mosaic_tpu"]
    if device.platform == "gpu" and tuple(map(int, device.compute_capability.split(".")[:2])) >= (9, 0):
        return ["mosaic_gpu", "triton"]
    return ["triton"]


def median_seconds(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each function (each returns once its work is done), after one warm-up call
    each (compilation), run in alternation so that load on the machine hits all of them alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def measure(k: int, n: int, m: int, *, repeats: int, backend: str, interpret: bool) -> dict[str, float]:
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, (k, n)).astype(np.int8)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    packed, scale = jnp.asarray(pack_ternary(codes)), jnp.full((n,), 0.01, jnp.float32)
    tiled = to_tiled(packed, k)  # the kernels' layout, as loaders give it on accelerators
    dense = jnp.asarray(codes * 0.01, jnp.bfloat16)
    kernel = jax.jit(lambda x, p, s: ternary_matmul(x, p, s, layout="tiled", backend=backend, interpret=interpret))
    xla = jax.jit(lambda x, p, s: ternary_matmul(x, p, s, backend="xla"))
    dot = jax.jit(lambda x, w: x @ w)
    ref = np.asarray(dot(x, dense), np.float32)
    err = float(np.abs(np.asarray(kernel(x, tiled, scale), np.float32) - ref).max() / max(np.abs(ref).max(), 1e-6))
    kernel_s, xla_s, dense_s = median_seconds([lambda: jax.block_until_ready(kernel(x, tiled, scale)),
                                               lambda: jax.block_until_ready(xla(x, packed, scale)),
                                               lambda: jax.block_until_ready(dot(x, dense))], repeats)
    return {
        "kernel_s": kernel_s,
        "xla_s": xla_s,
        "dense_s": dense_s,
        "packed_bytes": packed.size,
        "rel_err": err,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pallas_kernels.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", default=None, help="rows of x (default 1 16 64 256 4608; 1 on CPU)")
    parser.add_argument("--layers", nargs="+", choices=tuple(LAYERS), default=list(LAYERS))
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 10; 1 on CPU)")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    interpret = device.platform not in ("gpu", "tpu")
    backends = kernel_backends(device)
    ms = args.m or ([1] if interpret else [1, 16, 64, 256, 4608])
    repeats = args.repeats or (1 if interpret else 10)
    if min(ms) < 1 or repeats < 1:
        parser.error("--m and --repeats must be at least 1")
    peak = PEAK_BANDWIDTH.get(device.device_kind)
    print(f"device: {device.device_kind} ({device.platform}); kernel backends: {', '.join(backends)}"
          + (f"; peak bandwidth {peak / 1e12:.2f} TB/s" if peak else "; peak bandwidth unknown for this device"))
    if interpret:
        print("NOTE: no GPU or TPU here: the kernel runs in interpret mode (an emulator). These timings check "
              "that the benchmark runs; they are no performance figure.")
    print(f"{'layer':>10} {'kernel':>10} {'K':>6} {'N':>6} {'M':>5} | {'kernel ms':>10} {'xla ms':>9} {'bf16 ms':>9} | "
          f"{'vs bf16':>7} {'vs xla':>7} {'weight GB/s':>11} {'of peak':>7} | rel err")
    for name in args.layers:
        k, n = LAYERS[name]
        for m, backend in ((m, backend) for m in ms for backend in backends):
            r = measure(k, n, m, repeats=repeats, backend=backend, interpret=interpret)
            stream = r["packed_bytes"] / r["kernel_s"]
            frac = f"{100 * stream / peak:6.1f}%" if peak else "    n/a"
            print(f"{name:>10} {backend:>10} {k:>6} {n:>6} {m:>5} | {1e3 * r['kernel_s']:>10.3f} {1e3 * r['xla_s']:>9.3f} "
                  f"{1e3 * r['dense_s']:>9.3f} | {r['dense_s'] / r['kernel_s']:>6.2f}x {r['xla_s'] / r['kernel_s']:>6.2f}x "
                  f"{stream / 1e9:>11.1f} {frac} | {r['rel_err']:.1e}", flush=True)


if __name__ == "__main__":
    main()
