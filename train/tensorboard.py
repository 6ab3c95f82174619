"""Scalars as TensorBoard event files, framed by the `tensorboard` package's own record writer (no
TensorFlow, no PyTorch: tensorboardX would import torch wherever it is installed), on a local disk or
at any `etils.epath` location (gs://: see `flux_jax.io.files.append_file`)."""

from __future__ import annotations

import itertools
import os
import socket
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from flux_jax.io.files import append_file, location

_uid = itertools.count()


class ScalarWriter:
    def __init__(self, logdir: str | os.PathLike):
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_uid)}"
        self._records = RecordWriter(append_file(location(logdir) / name))
        self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        self._add(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def _add(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())
        self._records.flush()

    def close(self) -> None:
        self._records.close()
