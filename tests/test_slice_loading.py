"""On a mesh, each process reads from the safetensors files only the slices its devices hold."""

import itertools

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import flux_jax.params
from convert import load_flux
from convert.packed_io import write_packed_safetensors
from convert.safetensors_io import SafetensorsFiles, StoredTensor
from flux_jax import Flux
from flux_jax.params import leaf_sharding
from flux_jax.ternary import pack_model, quantize_model
from tests import helpers
from tests.torch_reference import TINY_DEV, bfl_state_dict, diffusers_model

MESHES = {"2x2x2": (2, 2, 2), "1x8x1": (1, 8, 1), "1x2x4": (1, 2, 4)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("slices")
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in bfl_state_dict(Flux(TINY_DEV, rngs=nnx.Rngs(0))).items()}
    save_file(state, root / "flux1-tiny.safetensors")
    diffusers_model(TINY_DEV, seed=2).save_pretrained(root / "diffusers", max_shard_size="200KB")
    write_packed_safetensors(pack_model(quantize_model(Flux(TINY_DEV, rngs=nnx.Rngs(1)))), root / "packed.safetensors")
    return {"bfl": root / "flux1-tiny.safetensors", "diffusers": root / "diffusers", "packed": root / "packed.safetensors"}


class _Reads:
    """Every region read from the files, attributed to the leaf being placed at the time."""

    def __init__(self, monkeypatch):
        self.leaves = []  # (shape, sharding, [elements of each file read])
        read, place = SafetensorsFiles.read, flux_jax.params._place_lazy

        def spy_read(files, key, index=None):
            value = read(files, key, index)
            self.leaves[-1][2].append(value.size)
            return value

        def spy_place(value, dtype, sharding):
            self.leaves.append((tuple(value.shape), sharding, []))
            return place(value, dtype, sharding)

        monkeypatch.setattr(SafetensorsFiles, "read", spy_read)
        monkeypatch.setattr(flux_jax.params, "_place_lazy", spy_place)


def _distinct_regions(shape, sharding):
    indices = sharding.addressable_devices_indices_map(shape).values()
    return {tuple(s.indices(n)[:2] for s, n in zip(index, shape)) for index in indices}


@pytest.mark.parametrize("mesh_shape", list(MESHES.values()), ids=list(MESHES))
@pytest.mark.parametrize("kind", ["bfl", "diffusers", "packed"])
def test_a_mesh_load_reads_each_held_region_once_and_equals_the_whole_tensor_load(checkpoints, kind, mesh_shape, monkeypatch):
    axes_dim = TINY_DEV.axes_dim  # the BFL file stores none; the others store these
    expected = dict(nnx.to_flat_state(nnx.state(load_flux(checkpoints[kind], axes_dim=axes_dim))))
    mesh = helpers.mesh(*mesh_shape)
    reads = _Reads(monkeypatch)
    model = load_flux(checkpoints[kind], mesh=mesh, axes_dim=axes_dim)

    abstract = dict(nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: model))))
    sharded = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var[...]
        # (1) the same values as reading whole tensors without a mesh
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[path][...]), err_msg=str(path))
        assert value.dtype == expected[path][...].dtype
        # (2) the logical sharding
        want = leaf_sharding(abstract[path], mesh)
        assert value.sharding.is_equivalent_to(want, value.ndim), (path, value.sharding, want)
        sharded += not want.is_fully_replicated
    assert sharded > len(expected) // 3

    # (3) reads are slices: each distinct shard region read once in all, none larger than its shard
    assert len(reads.leaves) == len(expected)  # every leaf is read lazily
    for shape, sharding, sizes in reads.leaves:
        regions = _distinct_regions(shape, sharding)
        assert sum(sizes) == sum(int(np.prod([b - a for a, b in r])) for r in regions), (shape, sharding.spec)
        if not sharding.is_fully_replicated:
            assert max(sizes) < int(np.prod(shape)), (shape, sharding.spec)
            assert max(sizes) <= int(np.prod(sharding.shard_shape(shape)))


def _write_parts(path, shapes, seed=0):
    rng = np.random.default_rng(seed)
    parts = {f"p{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    save_file(parts, path)
    return SafetensorsFiles([path]), parts


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_stored_tensor_regions_equal_slices_of_the_whole_transformed_tensor(tmp_path, swap, transpose):
    files, parts = _write_parts(tmp_path / "parts.safetensors", [(2, 3), (3, 3), (5, 3)])
    whole = np.concatenate(list(parts.values()), axis=0)
    if swap:
        whole = np.concatenate(np.split(whole, 2, axis=0)[::-1], axis=0)
    if transpose:
        whole = whole.T
    lazy = StoredTensor(files, tuple(parts), swap_halves=swap, axes=(1, 0) if transpose else None)
    assert lazy.shape == whole.shape
    rows_axis = 1 if transpose else 0
    for a, b in itertools.combinations(range(whole.shape[rows_axis] + 1), 2):
        for c, d in [(0, 3), (1, 2), (2, 3)]:
            index = [slice(c, d), slice(c, d)]
            index[rows_axis] = slice(a, b)
            np.testing.assert_array_equal(lazy.read(tuple(index)), whole[tuple(index)])


def test_a_region_inside_one_source_tensor_reads_only_that_region(tmp_path, monkeypatch):
    files, parts = _write_parts(tmp_path / "parts.safetensors", [(4, 6), (4, 6)])
    seen = []
    read = SafetensorsFiles.read
    monkeypatch.setattr(SafetensorsFiles, "read", lambda self, key, index=None: seen.append((key, index)) or read(self, key, index))
    lazy = StoredTensor(files, ("p0", "p1"), swap_halves=True, axes=(1, 0))
    np.testing.assert_array_equal(lazy.read((slice(2, 4), slice(1, 3))), parts["p1"][1:3, 2:4].T)
    assert seen == [("p1", (slice(1, 3), slice(2, 4)))]
