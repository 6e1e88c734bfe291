"""The scalars of ``metrics.jsonl`` as TensorBoard events (``tensorboard=True``).

Written with tensorboardX (no TensorFlow; the ``tensorboard`` extra) into
``<workdir>/tensorboard/``: each number of a record becomes the scalar
``<split>/<field>`` (``train/loss``, ``test/accuracy``, ...) at the record's
step and wall-clock time, so TensorBoard shows what metrics.jsonl holds. A
resumed run passes ``purge_step``: TensorBoard then drops what the killed run
wrote past its checkpoint, as metrics.jsonl does (``workdir.truncate_metrics``).
"""
from __future__ import annotations

import os
import time

NOT_SCALARS = ('split', 'step', 'timestamp')
EVENTS_DIR = 'tensorboard'


class EventWriter:
  """``write(record)`` as TensorBoard scalars; flushed after every record."""

  def __init__(self, workdir: str, purge_step: int | None = None):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.logdir = os.path.join(workdir, EVENTS_DIR)
    # A name of its own: two launches within a second would share tensorboardX's.
    self._writer = SummaryWriter(logdir=self.logdir, purge_step=purge_step,
                                 filename_suffix=f'.{time.time_ns()}')

  def write(self, record: dict) -> None:
    for key, value in record.items():
      if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
        continue                              # None (e.g. the first window's throughput), text
      self._writer.add_scalar(f"{record['split']}/{key}", value, global_step=record['step'],
                              walltime=record.get('timestamp'))
    self._writer.flush()   # a killed run keeps what metrics.jsonl keeps

  def close(self) -> None:
    self._writer.close()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` of every event file in ``logdir``, in
  file order, read back with tensorboardX's own protobuf classes (no
  TensorFlow). Steps a later file's ``purge_step`` discards are dropped, as
  TensorBoard does."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(f for f in os.listdir(logdir) if 'tfevents' in f):
    for event in _events(os.path.join(logdir, name), event_pb2):
      if event.HasField('session_log') and event.session_log.status == event.session_log.START:
        out = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in out.items()}
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def _events(path: str, event_pb2):
  """The records of a TFRecord file (length, crc, data, crc), parsed as Events."""
  with open(path, 'rb') as f:
    data = f.read()
  i = 0
  while i + 12 <= len(data):
    length = int.from_bytes(data[i:i + 8], 'little')
    payload = data[i + 12:i + 12 + length]
    i += 12 + length + 4
    event = event_pb2.Event()
    event.ParseFromString(payload)
    yield event
