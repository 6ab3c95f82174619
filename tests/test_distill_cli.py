"""The trainer's command line: flags and config files, SIGTERM, two processes on loopback."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from convert import load_flux
from flux_jax.ternary import describe
from train import distill


def test_sigterm_saves_and_exits(tmp_path):
    workdir = tmp_path / "preempted"
    process = subprocess.Popen(
        [sys.executable, "-m", "train.distill", "smoke", "--steps", "100000", "--save-every", "100000", "--log-every", "1",
         "--workdir", str(workdir), "--latent-height", "8", "--latent-width", "8", "--sampler-steps", "2",
         "--mesh.fsdp", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 240
    while not (workdir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    assert "preempted, saved at step" in out
    saved = int(out.split("saved at step ")[1].split(";")[0])
    assert saved >= 1 and (workdir / "checkpoints" / str(saved)).is_dir()


def test_cli_unknown_flag_and_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        distill.main(["smoke", "--no-such-flag", "3"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        distill.main(["smoke", "--teacher", str(tmp_path / "missing"), "--workdir", str(tmp_path / "w")])
    assert info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("python -m train.distill: error:")


def launch_two_processes(tmp_path, name: str, *flags: str) -> list:
    """`python -m train.distill smoke` as two processes on loopback, two CPU devices each; output to
    files, not pipes: a process blocked on a full pipe that the test is not reading yet would stall the
    other one inside a collective. Returns [(process, stdout file, stderr file)]."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "FLUX_JAX_CACHE": str(tmp_path / "cache")}  # the compile cache, shared by the two launches
    common = ["smoke", "--workdir", str(tmp_path / "run"), "--latent-height", "8", "--latent-width", "8",
              "--sampler-steps", "2", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", *flags]
    launched = []
    for i in range(2):
        out, err = tmp_path / f"{name}-{i}.out", tmp_path / f"{name}-{i}.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            launched.append((subprocess.Popen([sys.executable, "-m", "train.distill", *common, "--process-id", str(i)],
                                              env=env, stdout=stdout, stderr=stderr), out, err))
    return launched


def finished(launched) -> list[str]:
    """The stdout of each process, once all have exited with 0."""
    try:
        for p, _, _ in launched:
            p.wait(timeout=400)
    finally:
        for p, _, _ in launched:
            p.kill()
    for p, _, err in launched:
        assert p.returncode == 0, err.read_text()[-3000:]
    return [out.read_text() for _, out, _ in launched]


def test_two_processes_stop_together_resume_and_write_one_checkpoint(tmp_path):
    """A SIGTERM to one host stops both at the same step (agreed on a logged step, not by a sync every
    step); the run resumes with more steps (an accepted change) and both write its checkpoints and export."""
    launched = launch_two_processes(tmp_path, "first", "--steps", "100000", "--save-every", "100000", "--log-every", "2")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
        time.sleep(0.5)
    launched[1][0].send_signal(signal.SIGTERM)  # only the second host is told
    stopped = [int(out.split("preempted, saved at step ")[1].split(";")[0]) for out in finished(launched)]
    assert stopped[0] == stopped[1] and stopped[0] % 2 == 0, stopped  # the same step, a logged one
    end = stopped[0] + 2
    resumed = launch_two_processes(tmp_path, "resumed", "--steps", str(end), "--save-every", "100000", "--log-every", "2",
                                   "--allow-config-change", "steps")
    for out in finished(resumed):
        assert f"done at step {end}" in out
    saved = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
    # one checkpoint tree per step, written together by both (Orbax also saves a run's first step)
    assert {stopped[0], end} <= set(saved) and max(saved) == end
    assert [json.loads(r)["step"] for r in metrics.read_text().splitlines()] == list(range(2, end + 1, 2))  # process 0 only
    assert describe(load_flux(tmp_path / "run" / "student"))[0] == "student"


def test_config_file_sits_between_the_preset_and_the_flags(tmp_path):
    (tmp_path / "run.toml").write_text('steps = 7\nlearning_rate = 1\nprompts = "p.txt"\n[mesh]\nfsdp = 2\n')
    config = distill.parse(["smoke", "--config", str(tmp_path / "run.toml"), "--steps", "9"])
    assert (config.steps, config.learning_rate, config.prompts, config.mesh.fsdp) == (9, 1.0, "p.txt", 2)
    assert config.save_every == 10  # the smoke preset's, untouched by the file
    (tmp_path / "run.json").write_text('{"batch_size": 16}')
    assert distill.parse([f"--config={tmp_path / 'run.json'}"]).batch_size == 16  # over the default (digits) preset


@pytest.mark.parametrize(
    "content, message",
    [("stepz = 3\n", "unknown field 'stepz'"), ("[mesh]\nfsdpp = 2\n", "unknown field 'mesh.fsdpp'"),
     ('steps = "many"\n', "steps must be int"), ("steps = \n", "not a valid toml file"), ("mesh = 3\n", "mesh must be a table")],
)
def test_bad_config_files_are_named(tmp_path, content, message, capsys):
    (tmp_path / "run.toml").write_text(content)
    with pytest.raises(distill.ConfigError, match=message):
        distill.parse(["--config", str(tmp_path / "run.toml")])
    with pytest.raises(SystemExit) as info:
        distill.main(["--config", str(tmp_path / "run.toml")])
    assert info.value.code == 1 and "run.toml" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(distill.ConfigError, match="no such config file"):
        distill.parse(["--config", str(tmp_path / "missing.toml")])
