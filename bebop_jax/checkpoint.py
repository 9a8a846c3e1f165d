"""Checkpoints of a training run (orbax), and MTP heads read from a run or an HF directory.

`RunCheckpoints(run_dir)` manages `{run_dir}/checkpoints/{step}/` with three items per step:
`state` (a whole-state pytree: params, optimizer state, step counter, RNG keys), `data` (the grain
iterator's state) and `meta` (JSON: what the state holds, e.g. the MTPConfig, the loss, the trunk).
Saves are asynchronous; `close()` waits for them. Typed PRNG keys are stored as their raw key data
and rebuilt on restore, so a state with keys restores bit-exactly. Used by `bebop pretrain-mtp` now
and by RL later.

`load_mtp_heads(path)` reads the heads of the latest step of a pretraining run directory, or the
Qwen3-Next `mtp.*` tensors of an HF directory; `export_hf_with_mtp` writes such a directory. Heads
trained on a draft sub-vocabulary carry its ids (run meta `draft_ids`; HF tensor `mtp.draft_ids`).
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from bebop_jax.model import LoadedModel
from bebop_jax.model import tokenizer as tokenizer_lib
from bebop_jax.model import weights as weights_lib
from bebop_jax.model.mtp import MTPConfig, mtp_params_from_hf_tensors, mtp_params_to_hf_tensors


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class RunCheckpoints:
    """orbax CheckpointManager over `{run_dir}/checkpoints`: state pytree + grain iterator + JSON meta."""

    def __init__(self, run_dir: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator: grain.DatasetIterator | None, meta: dict) -> None:
        """Starts an asynchronous save of step `step` (the previous save is finished first)."""
        raw = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
        items = dict(state=ocp.args.StandardSave(raw), meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, step: int, like, data_iterator: grain.DatasetIterator | None = None):
        """(state shaped like the pytree `like`, meta); restores `data_iterator` in place when given.

        numpy leaves of `like` come back as numpy (uncommitted: a jitted step that took fresh, uncommitted
        arrays reuses its compilation), jax.Array leaves with their sharding, keys as keys.
        """
        abstract = jax.tree.map(lambda x: x if isinstance(x, np.ndarray) else ocp.utils.to_shape_dtype_struct(
            jax.random.key_data(x) if _is_key(x) else x), like)
        items = dict(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = jax.tree.map(lambda x, raw: jax.random.wrap_key_data(raw, impl=jax.random.key_impl(x))
                             if _is_key(x) else raw, like, out["state"])
        return state, out["meta"]

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_raw(self, step: int):
        """(state as saved, as numpy arrays, meta): for reading parameters only, on any devices (the state
        may have been saved sharded over another mesh, by several processes)."""
        saved = self.manager.item_metadata(step)["state"]  # the saved tree: shapes and dtypes
        like = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), saved)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class MTPHeadsCheckpoint(NamedTuple):
    cfg: MTPConfig
    params: dict  # MTP parameters (numpy)
    draft_ids: np.ndarray | None  # [Vd] int32, ascending: the draft sub-vocabulary; None = the full vocabulary


def _draft_ids(ids) -> np.ndarray | None:
    return None if ids is None else np.asarray(ids, np.int32)


def load_mtp_heads(path: str) -> MTPHeadsCheckpoint:
    """The heads of a `bebop pretrain-mtp` run directory (latest step) or of an HF directory holding
    Qwen3-Next `mtp.*` (or DeepSeek-V3 MTP) tensors beside the trunk."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        ckpt = RunCheckpoints(path)
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"run directory '{path}' holds no finished checkpoint")
        state, meta = ckpt.restore_raw(step)
        ckpt.close()
        return MTPHeadsCheckpoint(MTPConfig(**meta["mtp"]), jax.tree.map(np.asarray, state["params"]),
                                  _draft_ids(meta.get("draft_ids")))
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        tensors = weights_lib.read_safetensors_dir(path)
        mtp, params = mtp_params_from_hf_tensors(weights_lib.config_from_hf(hf), tensors)
        steps = hf.get("bebop_mtp_num_steps", mtp.num_steps)
        return MTPHeadsCheckpoint(MTPConfig(num_steps=steps, num_layers=mtp.num_layers), params,
                                  _draft_ids(tensors.get("mtp.draft_ids")))
    raise FileNotFoundError(f"'{path}' is neither a pretrain-mtp run directory (with checkpoints/) "
                            "nor an HF directory (with config.json)")


def export_hf_with_mtp(model: LoadedModel, mtp: MTPConfig, mtp_params: dict, path: str,
                       max_shard_bytes: int | None = None, draft_ids: np.ndarray | None = None) -> None:
    """Writes the trunk, the heads as Qwen3-Next `mtp.*` tensors and the tokenizer as one HF directory.

    config.json also records `num_nextn_predict_layers` (the distinct MTP layers, as DeepSeek-V3 and
    Qwen3-Next configs name it) and `bebop_mtp_num_steps` (K, which the tensors do not show).
    """
    tok = model.tokenizer
    weights_lib.save_hf(path, model.cfg, jax.tree.map(np.asarray, model.params),
                        bos_token_id=tok.bos_token_id if tok else None,
                        eos_token_id=tok.eos_token_ids[0] if tok and tok.eos_token_ids else None,
                        extra_tensors=mtp_params_to_hf_tensors(model.cfg, mtp, mtp_params)
                        | ({} if draft_ids is None else {"mtp.draft_ids": np.asarray(draft_ids, np.int32)}),
                        max_shard_bytes=max_shard_bytes)
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        hf = json.load(f)
    hf.update(num_nextn_predict_layers=mtp.num_layers, bebop_mtp_num_steps=mtp.num_steps)
    with open(config_file, "w") as f:
        json.dump(hf, f, indent=2)
    if tok is not None:
        tokenizer_lib.save_tokenizer(path, tok)
