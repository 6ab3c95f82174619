"""The trainer's outputs at a gs:// location, offline: a fake bucket behind `etils.epath` and Orbax.

`FakeGcs` serves gs://bucket/key from a local folder the way an object store behaves where it matters
here: no rename, and append mode overwrites (what gcsfs does with "a"). Orbax's array data goes through
TensorStore's GCS driver, pointed at the same folder; Orbax's own GCS logic (commit marker instead of a
temporary folder renamed into place) runs unchanged, since it looks only at the gs:// prefix.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
from etils.epath import backend, gpath
from flax import nnx
from orbax.checkpoint._src.path import gcs_utils
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from convert import CheckpointError, load_flux, save_flux
from convert.atomic import append_file, write_file
from convert.orbax_io import META_FILE, is_flux_checkpoint, load_flux_checkpoint
from flux_jax import Flux, FluxConfig
from flux_jax.ternary import describe, quantize_model
from train import distill
from train.cache import load_cache
from train.config import DistillConfig, MeshConfig
from train.samples import save_png
from train.tensorboard import ScalarWriter

CONFIG = DistillConfig(teacher="tiny", num_random_prompts=16, text_length=4, latent_height=8, latent_width=8,
                       batch_size=8, sampler_steps=2, mesh=MeshConfig(data=1, fsdp=1, tensor=1))


class FakeGcs(backend._OsPathBackend):
    def __init__(self, root: str):
        self.root = root
        self.writes: list[str] = []  # every object opened for writing, in order

    def local(self, path) -> str:
        return os.path.join(self.root, os.fspath(path).removeprefix("gs://"))

    def _uri(self, local) -> str:
        return "gs://" + os.path.relpath(local, self.root)

    def open(self, path, mode):
        if "w" in mode or "a" in mode:
            self.writes.append(os.fspath(path))
            os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)  # no folders in a bucket
        return super().open(self.local(path), mode.replace("a", "w"))

    def exists(self, path):
        return super().exists(self.local(path))

    def isdir(self, path):
        return super().isdir(self.local(path))

    def listdir(self, path):
        return super().listdir(self.local(path))

    def glob(self, path):
        return [self._uri(p) for p in super().glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in super().walk(self.local(top), top_down=top_down, on_error=on_error):
            yield self._uri(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        super().makedirs(self.local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        super().makedirs(self.local(path), exist_ok=exist_ok)

    def rmtree(self, path):
        super().rmtree(self.local(path))

    def remove(self, path):
        super().remove(self.local(path))

    def rename(self, path, dst):
        raise AssertionError(f"rename {path} -> {dst}: object stores have no rename")

    replace = rename

    def copy(self, path, dst, *, overwrite):
        super().copy(self.local(path), self.local(dst), overwrite=overwrite)

    def stat(self, path):
        return super().stat(self.local(path))


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    fake = FakeGcs(str(tmp_path / "gcs"))
    os.makedirs(fake.local("gs://bucket"))
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda path: {"driver": "file", "path": fake.local(path)})
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)  # asks the bucket
    return fake


def _leftovers(folder) -> list[str]:
    return [name for _, _, files in os.walk(folder) for name in files if "partial" in name or name.startswith(".")]


def test_write_file_is_one_object_write_remotely_and_a_rename_locally(gcs, tmp_path):
    write_file("gs://bucket/a/b.bin", b"old")
    write_file("gs://bucket/a/b.bin", b"new")
    assert open(gcs.local("gs://bucket/a/b.bin"), "rb").read() == b"new"
    assert gcs.writes == ["gs://bucket/a/b.bin"] * 2
    write_file(tmp_path / "local" / "b.bin", b"local")
    assert (tmp_path / "local" / "b.bin").read_bytes() == b"local" and not _leftovers(tmp_path / "local")


@pytest.mark.parametrize("remote", [True, False])
def test_append_file_keeps_earlier_lines(gcs, tmp_path, remote):
    path = "gs://bucket/run/metrics.jsonl" if remote else str(tmp_path / "run" / "metrics.jsonl")
    for line in (b"1\n", b"2\n"):
        with append_file(path) as f:
            f.write(line)
            f.flush()
    with append_file(path, upload_secs=3600) as f:
        for line in (b"3\n", b"4\n"):  # the second flush comes too soon: the upload waits for close
            f.write(line)
            f.flush()
    stored = gcs.local(path) if remote else path
    assert open(stored, "rb").read() == b"1\n2\n3\n4\n"
    assert len(gcs.writes) == (4 if remote else 0)


def test_latent_cache_is_built_and_read_back_at_a_remote_workdir(gcs):
    config = dataclasses.replace(CONFIG, workdir="gs://bucket/run", objective="cache")
    assert str(distill.cache(config)) == "gs://bucket/run/latent_cache"
    latents = load_cache(config, CONFIG.num_random_prompts)
    assert latents.shape == (16, 16, FluxConfig.preset("tiny").in_channels) and np.isfinite(latents).all()
    assert gcs.writes == ["gs://bucket/run/latent_cache/chunk-00000.npy"]
    distill.cache(config)  # present chunks are skipped
    assert len(gcs.writes) == 1


def test_png_and_tensorboard_events_remotely_and_locally(gcs, tmp_path):
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    for root in ("gs://bucket/run", str(tmp_path / "run")):
        save_png(image, f"{root}/samples/step-1.png", scale=2)
        board = ScalarWriter(f"{root}/tensorboard")
        board.scalars(1, {"loss": 0.5})
        board.scalars(2, {"loss": 0.25})
        board.close()
        local = gcs.local(root) if root.startswith("gs://") else root
        assert np.array_equal(np.asarray(Image.open(f"{local}/samples/step-1.png")), np.kron(image, np.ones((2, 2, 1), np.uint8)))
        (events,) = os.listdir(f"{local}/tensorboard")
        assert events.startswith("events.out.tfevents.")
        read = [e for e in EventFileLoader(f"{local}/tensorboard/{events}").Load() if e.HasField("summary")]
        assert [(e.step, e.summary.value[0].tag, e.summary.value[0].tensor.float_val[0]) for e in read] == [(1, "loss", 0.5), (2, "loss", 0.25)]
        assert not _leftovers(local)


def test_save_flux_to_a_remote_location_and_load_it_back(gcs):
    model = quantize_model(Flux(FluxConfig.preset("tiny"), rngs=nnx.Rngs(0)))
    out = save_flux(model, "gs://bucket/run/student")
    assert str(out) == "gs://bucket/run/student" and is_flux_checkpoint(out)
    assert gcs.writes[-1] == f"gs://bucket/run/student/{META_FILE}"  # the description last
    assert os.path.exists(gcs.local("gs://bucket/run/student/params/commit_success.txt"))  # Orbax's own marker
    loaded = load_flux_checkpoint("gs://bucket/run/student")
    assert describe(loaded)[0] == "student"
    assert describe(load_flux("gs://bucket/run/student"))[0] == "student"
    with pytest.raises(CheckpointError, match="gs://bucket/nothing: no such file or folder"):
        load_flux("gs://bucket/nothing")
    same = nnx.to_flat_state(nnx.state(loaded)), nnx.to_flat_state(nnx.state(model))
    assert all(np.array_equal(a[...], b[...]) for (_, a), (_, b) in zip(*same))
    with pytest.raises(CheckpointError, match="already exists"):
        save_flux(model, "gs://bucket/run/student")
    save_flux(model, "gs://bucket/run/student", overwrite=True)
    assert is_flux_checkpoint("gs://bucket/run/student")


def test_a_distillation_run_at_a_remote_workdir_logs_every_step_and_exports(gcs):
    result = distill.train(dataclasses.replace(CONFIG, workdir="gs://bucket/run", steps=3, save_every=2, log_every=1))
    assert result["last_step"] == 3
    rows = open(gcs.local("gs://bucket/run/metrics.jsonl")).read().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
    assert is_flux_checkpoint("gs://bucket/run/student") and is_flux_checkpoint("gs://bucket/run/packed")


def test_a_failed_remote_save_leaves_no_checkpoint(gcs, monkeypatch):
    def broken(model, directory):
        (directory / "params").mkdir()
        raise OSError("disk on fire")

    monkeypatch.setattr("convert.orbax_io.write_flux", broken)
    with pytest.raises(OSError, match="disk on fire"):
        save_flux(None, "gs://bucket/run/student")
    assert not os.path.exists(gcs.local("gs://bucket/run/student"))
