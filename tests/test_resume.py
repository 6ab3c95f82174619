"""Resuming a distillation: killed and resumed equals uninterrupted, on the same or another mesh; settings that may not change."""

import dataclasses
import json

import numpy as np
import pytest

from train import checkpointing, distill
from train.config import MeshConfig

from tests.distill_runs import BASE, EIGHT, run


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted BASE run on one device, which the resume and mesh tests compare against."""
    return run(tmp_path_factory.mktemp("straight"), "run")["losses"]


class Crash(Exception):
    pass


def crash_after(monkeypatch, crash_step):
    """Kill the run right after it saved `crash_step` (as a preempted machine would die)."""
    save = checkpointing.save

    def saving_then_crashing(mngr, step, state, force=False):
        saved = save(mngr, step, state, force=force)
        if step == crash_step:
            mngr.wait_until_finished()
            raise Crash(step)
        return saved

    monkeypatch.setattr(checkpointing, "save", saving_then_crashing)


def counting_quantizations(monkeypatch) -> list:
    """Calls of the trainer's quantize_model (the fresh student's only source), one entry each."""
    calls, real = [], distill.quantize_model
    monkeypatch.setattr(distill, "quantize_model", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


def test_killed_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, straight):
    with monkeypatch.context() as patch:
        crash_after(patch, 5)  # step 5 is logged but not saved: the resumed run does it again
        with pytest.raises(Crash):
            run(tmp_path, "resumed")
    quantized = counting_quantizations(monkeypatch)
    resumed = run(tmp_path, "resumed")["losses"]
    assert quantized == []  # restored into shapes: no student was quantized only to be overwritten
    assert sorted(resumed) == [5, 6]
    np.testing.assert_allclose([resumed[5], resumed[6]], [straight[5], straight[6]], rtol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # each step once
    np.testing.assert_allclose(rows[4]["loss"], straight[5], rtol=1e-6)


def test_eight_devices_give_the_losses_of_one_and_a_run_moves_to_a_smaller_mesh(tmp_path, monkeypatch, straight):
    """Steps 1-2 on eight devices (data 2 x fsdp 4), killed, then 3-6 on four (the mesh may change freely on
    resume): every loss equals the one-device run's."""
    with monkeypatch.context() as patch:
        crash_after(patch, 2)
        with pytest.raises(Crash):
            run(tmp_path, "moved", mesh=EIGHT)
    on_eight = {row["step"]: row["loss"] for row in map(json.loads, (tmp_path / "moved" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(on_eight) == [1, 2]
    moved = run(tmp_path, "moved", mesh=MeshConfig(data=1, fsdp=4, tensor=1))["losses"]
    assert sorted(moved) == [3, 4, 5, 6]
    losses = {**on_eight, **moved}
    np.testing.assert_allclose([losses[k] for k in straight], [straight[k] for k in straight], rtol=1e-4)


def test_resume_with_other_settings_names_each_change_and_stops(tmp_path, capsys):
    config = dataclasses.replace(BASE, workdir=str(tmp_path / "run"))
    distill.record_config(config)  # what the first start of a run writes
    assert json.loads((tmp_path / "run" / "config.json").read_text())["learning_rate"] == 1e-3
    changed = dataclasses.replace(config, learning_rate=2e-3, seed=1, steps=9, log_every=3, mesh=MeshConfig(data=1, fsdp=2, tensor=1))
    with pytest.raises(distill.ConfigError) as info:
        distill.train(changed)  # refused before the teacher is loaded
    message = str(info.value)
    for change in ("learning_rate: 0.001 -> 0.002", "seed: 0 -> 1", "steps: 6 -> 9", "--allow-config-change learning_rate seed steps"):
        assert change in message, message
    assert "log_every" not in message and "mesh" not in message  # free to change on resume
    with pytest.raises(distill.ConfigError, match="learning_rate"):
        distill.check_resume(dataclasses.replace(changed, allow_config_change=("seed", "steps")))
    with pytest.raises(distill.ConfigError, match="'lr' not a setting"):
        distill.check_resume(dataclasses.replace(changed, allow_config_change=("lr",)))
    capsys.readouterr()
    distill.check_resume(dataclasses.replace(changed, allow_config_change=("learning_rate", "seed", "steps")))
    accepted = capsys.readouterr().out.splitlines()
    assert accepted == [f"resuming with a changed setting (--allow-config-change): {change}"
                        for change in ("learning_rate: 0.001 -> 0.002", "seed: 0 -> 1", "steps: 6 -> 9")]
