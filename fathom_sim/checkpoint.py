"""Checkpoints of a run (orbax): the whole server state plus the host's bookkeeping.

A checkpoint at round t holds the `ServerState` after round t (params, server-optimizer state,
FATHOM's phi, hyper-optimizer state and moving average g, the round counter and the base key)
and, as JSON, what the host needs to continue exactly (the hyperparameters of round t+1 and the
cumulative counters) and the run's config, so that a checkpoint describes itself. Saves are asynchronous; orbax writes each one under a temporary name and
commits it by renaming, so a run killed mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from fathom_sim.types import ServerState

CHECKPOINTS = 'checkpoints'
UNREADABLE = 'unreadable_checkpoints'  # where unreadable ones are moved, never deleted


class Checkpointer:
  """Saves and restores a run's checkpoints under <workdir>/checkpoints."""

  def __init__(self, workdir: str, keep: int):
    self.workdir = workdir
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    self.keep = keep
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep,
                                           enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, state: ServerState, meta: dict[str, Any], *, wait: bool = False) -> None:
    """Saves round `state.round`; returns once the device arrays are copied, unless `wait`."""
    step = int(meta['round'])
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)))
    if wait:
      self._manager.wait_until_finished()

  def restore_newest(self, like: ServerState) -> tuple[ServerState, dict] | None:
    """The newest checkpoint that reads back whole; unreadable newer ones are moved aside."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    for step in reversed(self.steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        state, meta = restored.state, restored.meta
        if int(meta['round']) != step or int(jax.device_get(state.round)) != step:
          raise ValueError(f'checkpoint {step} holds round {meta["round"]}')
        return state, meta
      except Exception as e:  # any failure to read means: not a usable checkpoint
        moved = self._set_aside(step)
        logging.warning('checkpoint of round %d is unreadable (%s: %s); moved to %s, '
                        'falling back to the previous one', step, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else '', moved)
    return None

  def _set_aside(self, step: int) -> str:
    target_dir = os.path.join(self.workdir, UNREADABLE)
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, str(step))
    suffix = 0
    while os.path.exists(target):
      suffix += 1
      target = os.path.join(target_dir, f'{step}.{suffix}')
    shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager.close()
    self._manager = self._open()
    return target

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
