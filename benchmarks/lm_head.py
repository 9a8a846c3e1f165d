"""The LM head for a few rows on CPU: XLA's dot against the fused multiply-reduce of `vocab_logits`.

    python benchmarks/lm_head.py [--vocab 49152 4096] [--rows 1 2 4 8 16 32 64]

A verify step feeds K+1 positions per sequence, so its LM head is a product of a few rows with the
[V, D] matrix. Both forms are timed side by side (median of --repeats, after a compile) at SmolLM2's
width; `vocab_logits` picks the reduce form for transformer.FEW_ROWS rows on CPU. Writes JSON.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax.model.transformer import FEW_ROWS
from timing import median_seconds, write_result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 4096])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--width", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/lm_head.json")
    args = ap.parse_args()
    dot = jax.jit(lambda x, w: jnp.einsum("TD,VD->TV", x, w, preferred_element_type=jnp.float32))
    reduce = jax.jit(lambda x, w: jnp.sum(w[:, None, :] * x[None], axis=-1).T)
    rng = np.random.default_rng(0)
    results = []
    print(f"{'V':>6} {'rows':>4} {'dot ms':>8} {'reduce ms':>9} {'dot/reduce':>10}  used")
    for vocab in args.vocab:
        w = jnp.asarray(rng.standard_normal((vocab, args.width)), jnp.float32)
        for rows in args.rows:
            x = jnp.asarray(rng.standard_normal((rows, args.width)), jnp.float32)
            err = float(jnp.max(jnp.abs(dot(x, w) - reduce(x, w))))
            d, r = (1e3 * median_seconds(lambda f=f: f(x, w), args.repeats) for f in (dot, reduce))
            used = "reduce" if FEW_ROWS[0] <= rows <= FEW_ROWS[1] else "dot"
            results.append(dict(vocab=vocab, rows=rows, dot_ms=d, reduce_ms=r, ratio=d / r, max_abs_diff=err, used=used))
            print(f"{vocab:>6} {rows:>4} {d:8.2f} {r:9.2f} {d / r:10.2f}  {used}", flush=True)
    write_result(args.out, width=args.width, rows=results)


if __name__ == "__main__":
    main()
