import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from flux_jax import Flux, FluxConfig
from flux_jax.sharding import LOGICAL_AXIS_RULES, partition_spec


def _mesh(data=2, fsdp=2, tensor=2):
    return jax.make_mesh((data, fsdp, tensor), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_rules_map_logical_names_to_mesh_axes():
    mesh = _mesh()
    assert partition_spec(("embed", "qkv"), mesh) == P("fsdp", "tensor")
    assert partition_spec(("activation_batch", "activation_length", "activation_embed"), mesh) == P(("data", "fsdp"), None, None)
    assert all(isinstance(name, str) for name, _ in LOGICAL_AXIS_RULES)


def test_axes_that_do_not_divide_a_dimension_are_dropped():
    mesh = _mesh(data=4, fsdp=2, tensor=1)
    assert partition_spec(("activation_batch", None), mesh, (4, 3)) == P("data", None)
    assert partition_spec(("activation_batch", None), mesh, (1, 3)) == P(None, None)
    assert partition_spec(("embed", "mlp"), mesh, (3, 8)) == P(None, "tensor")


def test_model_built_under_a_mesh_is_sharded_by_the_table():
    config = FluxConfig.preset("tiny")
    with jax.set_mesh(_mesh()):
        model = Flux(config, rngs=nnx.Rngs(0))
    kernel = model.single_blocks[0].linear1.kernel[...]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (config.hidden_size // 2, kernel.shape[1] // 2)
    assert model.img_in.kernel[...].sharding.spec == P(None, "fsdp")
