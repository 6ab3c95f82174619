"""Orbax checkpoints of a run: the student and its optimizer state plus the step, restorable onto any
mesh (targets carry the new mesh's shardings). Orbax writes gs:// itself, committing each step with a
marker file where it cannot rename."""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from flax import nnx

from flux_jax.io.files import location


def manager(workdir: str, *, save_every: int, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep, create=True)
    return ocp.CheckpointManager(location(workdir) / "checkpoints", options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: nnx.State, *, force: bool = False) -> bool:
    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(nnx.to_pure_dict(state))), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: nnx.State) -> nnx.State:
    """The saved state at `step`, each array placed with the sharding `abstract_state` gives it."""
    targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(nnx.to_pure_dict(targets))))
    nnx.replace_by_pure_dict(abstract_state, restored["state"])
    return abstract_state
