import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from flux_jax import Flux, FluxConfig
from flux_jax.sharding import LOGICAL_AXIS_RULES, ShardingError, check_sharded, partition_spec, unsharded
from tests import helpers


def test_rules_map_logical_names_to_mesh_axes():
    mesh = helpers.mesh()
    assert partition_spec(("embed", "qkv"), mesh) == P("fsdp", "tensor")
    assert partition_spec(("activation_batch", "activation_length", "activation_embed"), mesh) == P(("data", "fsdp"), None, None)
    assert all(isinstance(name, str) for name, _ in LOGICAL_AXIS_RULES)


def test_axes_that_do_not_divide_a_dimension_are_dropped():
    mesh = helpers.mesh(data=4, fsdp=2, tensor=1)
    assert partition_spec(("activation_batch", None), mesh, (4, 3)) == P("data", None)
    assert partition_spec(("activation_batch", None), mesh, (1, 3)) == P(None, None)
    assert partition_spec(("embed", "mlp"), mesh, (3, 8)) == P(None, "tensor")


def test_model_built_under_a_mesh_is_sharded_by_the_table():
    config = FluxConfig.preset("tiny")
    with jax.set_mesh(helpers.mesh()):
        model = Flux(config, rngs=nnx.Rngs(0))
    kernel = model.single_blocks[0].linear1.kernel[...]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (config.hidden_size // 2, kernel.shape[1] // 2)
    assert model.img_in.kernel[...].sharding.spec == P(None, "fsdp")


@pytest.fixture(scope="module")
def tiny_abstract():
    return nnx.eval_shape(lambda: Flux(FluxConfig.preset("tiny"), rngs=nnx.Rngs(0)))


def test_a_mesh_that_does_not_divide_the_big_weights_is_refused_naming_them(tiny_abstract):
    with pytest.raises(ShardingError) as err:
        check_sharded(tiny_abstract, helpers.mesh(data=1, fsdp=3, tensor=1))  # hidden size 64 over 3
    message = str(err.value)
    assert message.startswith("mesh data=1 fsdp=3 tensor=1 leaves each device ")
    # the biggest kernels name themselves first: single-block linear1, 64 x 448 float32, whole on each device
    assert "Largest: single_blocks.0.linear1.kernel (64, 448): fsdp dropped (+0.0729 MiB a device)" in message


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (1, 2, 4), (8, 1, 1)])
def test_meshes_that_divide_the_model_pass(tiny_abstract, shape):
    assert unsharded(tiny_abstract, helpers.mesh(*shape))[0] == []
    check_sharded(tiny_abstract, helpers.mesh(*shape), tolerance=0.0)


class _Layer(nnx.Module):
    """A kernel the fsdp axis divides, maybe one it does not, and a bias the tensor axis does not divide."""

    def __init__(self, width: int, odd: bool):
        param = lambda shape, names: nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=names)  # noqa: E731
        self.kernel = param((64, width), ("embed", "mlp"))
        self.odd = param((6, 8), ("embed", None)) if odd else None
        self.bias = param((5,), ("mlp",))


def test_the_tolerance_bounds_the_excess_over_the_rules_layout():
    mesh = helpers.mesh(data=1, fsdp=4, tensor=2)
    found, planned = unsharded(_Layer(8, odd=True), mesh)
    # per device under the rules: kernel 64*8*4 / 8, odd 6*8*4 / 4, bias 5*4 / 2; held: odd and bias whole
    assert planned == 64 * 8 * 4 / 8 + 6 * 8 * 4 / 4 + 5 * 4 / 2
    assert [(u.path, u.shape, u.dropped, u.excess_bytes) for u in found] == [
        ("odd", (6, 8), ("fsdp",), 6 * 8 * 4 * (1 - 1 / 4)), ("bias", (5,), ("tensor",), 5 * 4 * (1 - 1 / 2))]
    fraction = (144 + 10) / planned  # 154 / 314 = 49.0%
    with pytest.raises(ShardingError, match=r"49\.0% more .* \(tolerance 49\.0%\)"):
        check_sharded(_Layer(8, odd=True), mesh, tolerance=math.floor(fraction * 1000) / 1000)
    check_sharded(_Layer(8, odd=True), mesh, tolerance=fraction)


def test_a_small_bias_left_whole_does_not_trip_the_default_tolerance():
    layer, mesh = _Layer(64, odd=False), helpers.mesh(data=1, fsdp=4, tensor=2)
    found, planned = unsharded(layer, mesh)
    assert [u.path for u in found] == ["bias"] and sum(u.excess_bytes for u in found) / planned == 10 / (2048 + 10)
    check_sharded(layer, mesh)


def test_sharding_a_model_onto_a_bad_mesh_is_refused():
    from flux_jax.params import shard

    with pytest.raises(ShardingError, match=r"single_blocks\.0\.linear1\.kernel"):
        shard(Flux(FluxConfig.preset("tiny"), rngs=nnx.Rngs(0)), helpers.mesh(data=1, fsdp=3, tensor=1))
