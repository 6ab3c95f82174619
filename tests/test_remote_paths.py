"""The trainer's outputs at a gs:// location, offline, against a real GCS JSON API: `gcp-storage-emulator`
on a loopback port, which gcsfs (`etils.epath`'s gs:// backend), google-cloud-storage (Orbax asks the
bucket's layout) and TensorStore (Orbax's array data) all reach through their own endpoint settings.
Nothing in those libraries is patched; the emulator gets one header real GCS sends (see EMULATOR).

What the hand-written fake these tests used to run on caught and the emulator cannot (it renames and
appends as gcsfs asks) is checked on the emulator's request log instead: real GCS has no rename (gcsfs
imitates one with a copy and a delete, which a reader can see half done), so no test here may send a
moveTo, rewriteTo, copyTo or compose request, and each write we call atomic must be one object upload.
Not covered: the emulator ignores preconditions (ifGenerationMatch), so nothing here shows that a
second writer of the same OCDBT manifest would be refused, and it is one bucket without hierarchical
namespace.
"""

import dataclasses
import importlib.util
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from convert import CheckpointError, load_flux, save_flux
from convert.orbax_io import META_FILE, is_flux_checkpoint, load_flux_checkpoint
from flux_jax import Flux, FluxConfig
from flux_jax.io.errors import OutputExistsError
from flux_jax.io.files import append_file, persist, write_file
from flux_jax.ternary import describe, quantize_model
from train import distill
from train.cache import load_cache
from train.config import DistillConfig, MeshConfig
from train.data import PromptEmbeddings
from train.samples import save_png
from train.tensorboard import ScalarWriter

# Not imported here: gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT (set by the fixture) when first imported.
pytestmark = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("gcp_storage_emulator", "gcsfs")),
                                reason="needs the test extra (gcp-storage-emulator, gcsfs)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = DistillConfig(teacher="tiny", num_random_prompts=16, text_length=4, latent_height=8, latent_width=8,
                       batch_size=8, sampler_steps=2, mesh=MeshConfig(data=1, fsdp=1, tensor=1))
RENAMES = ("/moveTo/", "/rewriteTo/", "/copyTo/", "/compose")


class Emulator:
    """The emulator's address and what it was asked, read from its request log."""

    def __init__(self, url: str, log: str):
        self.url, self.log = url, log

    def requests(self) -> list[tuple[str, str]]:
        """(method, path with query) of every request so far, in order."""
        with open(self.log) as f:
            return [tuple(line.split('"')[1].split()[:2]) for line in f if line.startswith('"') and " HTTP/1." in line]

    def uploads(self, since: int = 0) -> list[str]:
        """gs:// names of the objects whose upload started after request number `since`, in order."""
        names = []
        for method, target in self.requests()[since:]:
            url = urllib.parse.urlsplit(target)
            query = urllib.parse.parse_qs(url.query)
            if method == "POST" and url.path.startswith("/upload/") and "upload_id" not in query:
                names.append(f"gs://{url.path.split('/')[5]}/{query['name'][0]}")
        return names

    def renames(self) -> list[str]:
        return [target for _, target in self.requests() if any(r in target.split("?")[0] for r in RENAMES)]

    def read(self, path: str) -> bytes:
        """An object's bytes, straight from the JSON API (none of the clients under test)."""
        bucket, name = path.removeprefix("gs://").split("/", 1)
        with urllib.request.urlopen(f"{self.url}/download/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media") as r:
            return r.read()

    def names(self, prefix: str) -> list[str]:
        """gs:// names of every object under `prefix`/."""
        bucket, name = prefix.removeprefix("gs://").split("/", 1)
        query = urllib.parse.urlencode({"prefix": name.rstrip("/") + "/"})
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}") as r:
            return sorted(f"gs://{bucket}/{item['name']}" for item in json.load(r).get("items", []))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, server: subprocess.Popen, log: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    server.kill()
    pytest.fail(f"the GCS emulator did not start:\n{open(log).read()[-3000:]}")


# The emulator, with one header added that real GCS sends with every object it serves and TensorStore
# needs (it reads OCDBT manifests conditionally, on their generation): x-goog-generation.
EMULATOR = """
import sys
from gcp_storage_emulator import __main__ as cli, server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

served = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        response["x-goog-generation"] = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])["generation"]
    except NotFound:
        pass
    return served(request, response, storage, *args, **kwargs)


objects.download = download  # objects.get serves ?alt=media through it
for _, handlers in server.HANDLERS:
    handlers.update({method: download for method, handler in handlers.items() if handler is served})
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator with the bucket `bucket`, for the module; the environment that points every client
    at it is set for this process and the processes it starts, and restored afterwards."""
    log = str(tmp_path_factory.mktemp("gcs") / "emulator.log")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as sink:  # without --quiet the emulator logs every request
        server = subprocess.Popen([sys.executable, "-c", EMULATOR, "start", "--host", "127.0.0.1", "--port", str(port),
                                   "--in-memory", "--default-bucket", "bucket"], stdout=sink, stderr=sink)
    try:
        _wait_until_up(url, server, log)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs and google-cloud-storage (anonymous there)
            env.setenv("TENSORSTORE_GCS_HTTP_URL", url)
            env.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # TensorStore's bearer token: no credential lookup
            env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # its bucket-type probe is gRPC, which the emulator lacks
            yield Emulator(url, log)
    finally:
        server.terminate()
        server.wait(timeout=30)


_folders = itertools.count()


@pytest.fixture
def root(gcs):
    """A fresh folder in the bucket for each test (the emulator lives for the whole module)."""
    return f"gs://bucket/test-{next(_folders)}"


def _leftovers(folder) -> list[str]:
    return [name for _, _, files in os.walk(folder) for name in files if "partial" in name or name.startswith(".")]


def test_write_file_is_one_object_upload_remotely_and_a_rename_locally(gcs, root, tmp_path):
    since = len(gcs.requests())
    write_file(f"{root}/a/b.bin", b"old")
    write_file(f"{root}/a/b.bin", b"new")
    assert gcs.read(f"{root}/a/b.bin") == b"new"
    assert gcs.uploads(since) == [f"{root}/a/b.bin"] * 2 and not gcs.renames()
    write_file(tmp_path / "local" / "b.bin", b"local")
    assert (tmp_path / "local" / "b.bin").read_bytes() == b"local" and not _leftovers(tmp_path / "local")


@pytest.mark.parametrize("remote", [True, False])
def test_append_file_keeps_earlier_lines(gcs, root, tmp_path, remote):
    path = f"{root}/run/metrics.jsonl" if remote else str(tmp_path / "run" / "metrics.jsonl")
    since = len(gcs.requests())
    for line in (b"1\n", b"2\n"):
        with append_file(path) as f:
            f.write(line)
            f.flush()
    with append_file(path, upload_secs=3600) as f:
        for line in (b"3\n", b"4\n"):  # the second flush comes too soon: the upload waits for close
            f.write(line)
            f.flush()
    assert (gcs.read(path) if remote else open(path, "rb").read()) == b"1\n2\n3\n4\n"
    assert gcs.uploads(since) == ([path] * 4 if remote else [])


@pytest.mark.parametrize("remote", [True, False])
def test_persist_makes_logged_lines_survive_a_kill(gcs, root, tmp_path, remote):
    path = f"{root}/metrics.jsonl" if remote else str(tmp_path / "metrics.jsonl")
    log = append_file(path, upload_secs=3600)
    log.write(b"1\n")
    log.flush()  # remotely the first flush uploads, the next ones wait for the interval
    log.write(b"2\n")
    log.flush()
    log.write(b"3\n")
    persist(log)
    assert (gcs.read(path) if remote else open(path, "rb").read()) == b"1\n2\n3\n"  # before any close
    log.close()


def test_png_and_tensorboard_events_remotely_and_locally(gcs, root, tmp_path):
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    for folder in (root, str(tmp_path / "run")):
        save_png(image, f"{folder}/samples/step-1.png", scale=2)
        board = ScalarWriter(f"{folder}/tensorboard")
        board.scalars(1, {"loss": 0.5})
        board.scalars(2, {"loss": 0.25})
        board.close()
        if folder.startswith("gs://"):
            png = io.BytesIO(gcs.read(f"{folder}/samples/step-1.png"))
            (events,) = gcs.names(f"{folder}/tensorboard")
            local_events = tmp_path / "events"
            local_events.write_bytes(gcs.read(events))
            assert gcs.names(folder) == sorted([f"{folder}/samples/step-1.png", events])  # nothing half-written beside them
        else:
            png, (events,) = f"{folder}/samples/step-1.png", os.listdir(f"{folder}/tensorboard")
            local_events = f"{folder}/tensorboard/{events}"
            assert not _leftovers(folder)
        assert np.array_equal(np.asarray(Image.open(png)), np.kron(image, np.ones((2, 2, 1), np.uint8)))
        assert os.path.basename(events).startswith("events.out.tfevents.")
        read = [e for e in EventFileLoader(str(local_events)).Load() if e.HasField("summary")]
        assert [(e.step, e.summary.value[0].tag, e.summary.value[0].tensor.float_val[0]) for e in read] == [(1, "loss", 0.5), (2, "loss", 0.25)]


def test_save_flux_to_a_remote_location_and_load_it_back(gcs, root):
    model = quantize_model(Flux(FluxConfig.preset("tiny"), rngs=nnx.Rngs(0)))
    since = len(gcs.requests())
    out = save_flux(model, f"{root}/student")
    assert str(out) == f"{root}/student" and is_flux_checkpoint(out)
    assert gcs.uploads(since)[-1] == f"{root}/student/{META_FILE}"  # the description last
    assert f"{root}/student/params/commit_success.txt" in gcs.names(root)  # Orbax's own marker, not a renamed folder
    assert not gcs.renames()
    loaded = load_flux_checkpoint(f"{root}/student")
    assert describe(loaded)[0] == "student"
    assert describe(load_flux(f"{root}/student"))[0] == "student"
    with pytest.raises(CheckpointError, match=f"{root}/nothing: no such file or folder"):
        load_flux(f"{root}/nothing")
    same = nnx.to_flat_state(nnx.state(loaded)), nnx.to_flat_state(nnx.state(model))
    assert all(np.array_equal(a[...], b[...]) for (_, a), (_, b) in zip(*same))
    with pytest.raises(OutputExistsError, match="already exists"):
        save_flux(model, f"{root}/student")
    save_flux(model, f"{root}/student", overwrite=True)
    assert is_flux_checkpoint(f"{root}/student")


def test_a_failed_remote_save_leaves_no_checkpoint(gcs, root, monkeypatch):
    def broken(model, directory):
        (directory / "params" / "half.bin").write_bytes(b"half")
        raise OSError("disk on fire")

    monkeypatch.setattr("convert.orbax_io.write_flux", broken)
    with pytest.raises(OSError, match="disk on fire"):
        save_flux(None, f"{root}/student")
    assert gcs.uploads()[-1] == f"{root}/student/params/half.bin"  # something was written, then removed
    assert gcs.names(root) == []


# A run killed (SIGKILL: no cleanup, no upload at close) when it is about to save `step`, once its
# earlier checkpoints are complete.
KILLED_BEFORE_SAVING = """
import os, signal, sys
from train import checkpointing, distill

save = checkpointing.save


def die_before(mngr, step, *args, **kwargs):
    if step == int(os.environ["KILL_BEFORE_SAVING"]):
        mngr.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(mngr, step, *args, **kwargs)


checkpointing.save = die_before
distill.main(sys.argv[1:])
"""


def _run(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=900)


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_killed_remote_run_resumes_with_teacher_prompts_and_latent_cache_on_gcs(gcs, root):
    """`python -m train.distill --workdir gs://...` killed as it is about to save its last step (4), its
    step-2 checkpoint complete, then run again: it redoes steps 3 and 4 from that checkpoint and logs the
    losses the killed run logged. Every row logged before the kill is in the bucket (the log is uploaded
    before each checkpoint, not only every 30 s and at close). Teacher, prompt embeddings and latent
    cache are all read from the bucket."""
    teacher = Flux(FluxConfig.preset("tiny"), rngs=nnx.Rngs(3))
    save_flux(teacher, f"{root}/teacher")
    prompts = PromptEmbeddings.random(16, 4, teacher.config, seed=5)
    buffer = io.BytesIO()
    np.savez(buffer, txt=prompts.txt, y=prompts.y)
    write_file(f"{root}/prompts.npz", buffer.getvalue())
    config = dataclasses.replace(CONFIG, teacher=f"{root}/teacher", prompts=f"{root}/prompts.npz", objective="cache",
                                 workdir=f"{root}/run")
    since = len(gcs.requests())
    built = distill.cache(config)
    assert gcs.uploads(since) == [f"{built}/chunk-00000.npy"]
    distill.cache(config)  # present chunks are skipped
    assert len(gcs.uploads(since)) == 1
    assert load_cache(config, 16).shape == (16, 16, teacher.config.in_channels)

    flags = ["digits", "--teacher", config.teacher, "--prompts", config.prompts, "--workdir", config.workdir,
             "--objective", "cache", "--text-length", "4", "--latent-height", "8", "--latent-width", "8",
             "--batch-size", "8", "--sampler-steps", "2", "--steps", "4", "--save-every", "2", "--log-every", "1",
             "--sample-every", "0", "--mesh.fsdp", "1"]
    killed = _run(["-c", KILLED_BEFORE_SAVING, *flags], KILL_BEFORE_SAVING="4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"{root}/run/checkpoints/2/commit_success.txt" in gcs.names(f"{root}/run/checkpoints")
    assert not gcs.names(f"{root}/run/checkpoints/4") and not gcs.names(f"{root}/run/student")
    before = _rows(gcs.read(f"{root}/run/metrics.jsonl").decode())
    assert [r["step"] for r in before] == [1, 2, 3, 4]

    resumed = _run(["-m", "train.distill", *flags])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"done at step 4; checkpoints in {root}/run/checkpoints, student in {root}/run/student" in resumed.stdout
    after = _rows(gcs.read(f"{root}/run/metrics.jsonl").decode())
    assert [r["step"] for r in after] == [1, 2, 3, 4]  # each step once
    np.testing.assert_allclose([r["loss"] for r in after], [r["loss"] for r in before], rtol=1e-6)
    assert after[:2] == before[:2]  # rows the checkpoint covers are kept as they were
    assert describe(load_flux(f"{root}/run/student"))[0] == "student"
    assert is_flux_checkpoint(f"{root}/run/packed") and not gcs.renames()
