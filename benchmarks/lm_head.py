"""The LM head for a few rows on CPU: the plain dot, a fused multiply-reduce, and `vocab_logits`.

    python benchmarks/lm_head.py [--vocab 49152 4096] [--rows 1 2 4 8 16 32 64]

A verify step feeds K+1 positions per sequence, so its LM head is a product of a few rows with the
[V, D] matrix. Timed side by side (median of --repeats, after a compile) at SmolLM2's width:
  dot      x W^T as one plain dot
  reduce   sum over D of W[:, None, :] * x[None] (the form `vocab_logits` used for 2-32 rows until session 12)
  used     `vocab_logits` itself (`transformer.linear`: W on the left of the dot for FEW_ROWS rows)
Standalone timings only: inside the decode loop the reduce form of the draft heads' gathered [Vd, D]
rows was materialised as a broadcast over the rows (see `vocab_logits`). Writes JSON.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax.model.transformer import vocab_logits
from timing import median_seconds, write_result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 4096])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--width", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/lm_head.json")
    args = ap.parse_args()
    forms = {"dot": jax.jit(lambda x, w: jnp.einsum("TD,VD->TV", x, w, preferred_element_type=jnp.float32)),
             "reduce": jax.jit(lambda x, w: jnp.sum(w[:, None, :] * x[None], axis=-1).T),
             "used": jax.jit(vocab_logits)}
    rng = np.random.default_rng(0)
    results = []
    print(f"{'V':>6} {'rows':>4} {'dot ms':>8} {'reduce ms':>9} {'used ms':>8} {'used/dot':>8}")
    for vocab in args.vocab:
        w = jnp.asarray(rng.standard_normal((vocab, args.width)), jnp.float32)
        for rows in args.rows:
            x = jnp.asarray(rng.standard_normal((rows, args.width)), jnp.float32)
            want = forms["dot"](x, w)
            err = max(float(jnp.max(jnp.abs(f(x, w) - want))) for f in forms.values())
            ms = {name: 1e3 * median_seconds(lambda f=f: f(x, w), args.repeats) for name, f in forms.items()}
            results.append(dict(vocab=vocab, rows=rows, **{f"{k}_ms": v for k, v in ms.items()},
                                used_over_dot=ms["used"] / ms["dot"], max_abs_diff=err))
            print(f"{vocab:>6} {rows:>4} {ms['dot']:8.2f} {ms['reduce']:9.2f} {ms['used']:8.2f} "
                  f"{ms['used'] / ms['dot']:8.2f}", flush=True)
    write_result(args.out, width=args.width, rows=results)


if __name__ == "__main__":
    main()
