"""Both Pallas kernels (interpret mode) under a `placement.Partition` on 8 fake CPU devices, against the
same kernels unsharded and the jnp references; run by tests/test_kernel_partition.py, writes JSON.

Mesh data=2 x fsdp=2 x tensor=2: rows over (data, fsdp) = 4 shards, the vocabulary over tensor = 2
shards (and a second partition with the vocabulary whole). Row counts that the shards do not divide
exercise the padding.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kernels_pallas import rejection_sampling as rs
from kernels_pallas import tv_loss as tv
from kernels_pallas.placement import Partition


def _max_diff(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def acceptance_checks(partition: Partition) -> dict:
    n, d, v = 30, 16, 512
    k = jax.random.split(jax.random.key(0), 4)
    h_d, h_t = (jax.random.normal(x, (n, d)) for x in k[:2])
    w = jax.random.normal(k[2], (v, d)) * 0.5
    logz = jax.nn.logsumexp(h_t @ w.T, axis=-1) + 0.3  # p over a larger vocabulary: not normalised on w
    small = tv.BlockSizes(8, 128)

    def loss(impl, part, **kw):
        def f(a, c):
            return tv.fused_acceptance(a, h_t, c, implementation=impl, block_sizes=small, partition=part, **kw)
        return jax.jit(lambda a, c: (f(a, c), jax.grad(lambda a, c: f(a, c).sum(), argnums=(0, 1))(a, c)))

    out = {}
    ref = loss("reference", None, grad_wrt_vocab=True)(h_d, w)
    got = loss("pallas_interpret", partition, grad_wrt_vocab=True)(h_d, w)
    out["alpha"], out["grad_draft"], out["grad_vocab"] = (_max_diff(a, b) for a, b in
                                                         zip((ref[0], *ref[1]), (got[0], *got[1])))
    ref = loss("reference", None, target_logz=logz)(h_d, w)
    got = loss("pallas_interpret", partition, target_logz=logz)(h_d, w)
    out["alpha_logz"], out["grad_draft_logz"] = _max_diff(ref[0], got[0]), _max_diff(ref[1][0], got[1][0])
    return out


def rejection_checks(partition: Partition) -> dict:
    b, kd, v = 6, 3, 512
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.nn.softmax(2 * jax.random.normal(keys[0], (b, kd, v)), axis=-1)
    p = jax.nn.softmax(2 * jax.random.normal(keys[1], (b, kd + 1, v)), axis=-1)
    out = {}
    for mode in rs.MODES:
        sharded = jax.jit(lambda d, q, p, key, mode=mode: rs.rejection_sample(
            d, q, p, key, mode=mode, implementation="pallas_interpret", validate=False, partition=partition))
        same = []
        for seed in range(8):  # one compile per mode, eight keys through it
            key = jax.random.key(seed)
            drafts = jax.random.categorical(jax.random.fold_in(key, 7), jnp.log(q), axis=-1).astype(jnp.int32)
            ref = rs.rejection_sample(drafts, q, p, key, mode=mode, implementation="reference")
            got = sharded(drafts, q, p, key)
            same.append(bool(np.array_equal(ref[0], got[0]) and np.array_equal(ref[1], got[1])))
        out[mode] = all(same)
    return out


def main(path: str) -> None:
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    results = {}
    for name, part in (("vocab_split", Partition(mesh, ("data", "fsdp"), "tensor")),
                       ("vocab_whole", Partition(mesh, ("data", "fsdp", "tensor"), None))):
        results[name] = {"acceptance": acceptance_checks(part), "rejection": rejection_checks(part)}
    with open(path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
