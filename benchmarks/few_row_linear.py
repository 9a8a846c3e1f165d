"""Few rows against the trunk's matrices on XLA:CPU: which weight layout and dot form reads W at memory speed.

    python benchmarks/few_row_linear.py [--rows 1 2 4 8 16 32] [--layers 30] [--repeats 20] [--out FILE]

A chain of SmolLM2-sized MLP pairs (x += tanh(x W_up) W_down, D=576, F=1536, `--layers` distinct pairs,
~106 MB of f32 weights at 30, so every step reads them from memory), run three ways side by side:
  in_out       weights [in, out], `x @ W`: the trunk's layout and form before `transformer.linear`
  out_in       weights [out, in] (the checkpoint's layout, the trunk's since), y = (W x^T)^T with an
               optimization barrier before the transpose (without it XLA folds the transpose into the dot
               and is back to the slow form): what `transformer.linear` does for 2-64 rows on CPU
  feature_major weights [out, in], activations kept [D, rows] through the chain: W x
  out_in_right weights [out, in], `x W^T` as one dot with W on the right: what `transformer.linear` does
               for other row counts
Prints milliseconds per chain and in_out / out_in per row count. Writes JSON.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from timing import median_seconds, write_result

D, F = 576, 1536


def in_out(x, ups, downs):
    for up, down in zip(ups, downs):
        x = x + jnp.tanh(x @ up) @ down
    return x


def _out_in_linear(x, w):
    """x [rows, in], w [out, in] -> [rows, out] as one dot with W as the left operand."""
    return jax.lax.optimization_barrier(jnp.einsum("oi,ri->or", w, x)).T


def out_in(x, ups_t, downs_t):
    for up, down in zip(ups_t, downs_t):
        x = x + _out_in_linear(jnp.tanh(_out_in_linear(x, up)), down)
    return x


def out_in_right(x, ups_t, downs_t):
    for up, down in zip(ups_t, downs_t):
        x = x + jnp.einsum("ri,oi->ro", jnp.tanh(jnp.einsum("ri,oi->ro", x, up)), down)
    return x


def feature_major(x, ups_t, downs_t):
    xt = x.T
    for up, down in zip(ups_t, downs_t):
        xt = xt + down @ jnp.tanh(up @ xt)
    return xt.T


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/few_row_linear.json")
    args = ap.parse_args()
    key = jax.random.key(0)
    ups = [0.02 * jax.random.normal(jax.random.fold_in(key, i), (D, F)) for i in range(args.layers)]
    downs = [0.02 * jax.random.normal(jax.random.fold_in(key, 1000 + i), (F, D)) for i in range(args.layers)]
    ups_t, downs_t = [w.T.copy() for w in ups], [w.T.copy() for w in downs]
    forms = {"in_out": (jax.jit(in_out), ups, downs), "out_in": (jax.jit(out_in), ups_t, downs_t),
             "feature_major": (jax.jit(feature_major), ups_t, downs_t),
             "out_in_right": (jax.jit(out_in_right), ups_t, downs_t)}
    rows = []
    print(f"{'rows':>4} {'in_out ms':>10} {'out_in ms':>10} {'feature-major ms':>17} {'W right ms':>11} "
          f"{'in_out/out_in':>14}")
    for r in args.rows:
        x = jax.random.normal(key, (r, D))
        ref = forms["in_out"][0](x, ups, downs)
        row = {"rows": r}
        for name, (fn, a, b) in forms.items():
            err = float(jnp.max(jnp.abs(fn(x, a, b) - ref)))
            assert err < 1e-3, f"{name} differs from in_out by {err}"
            row[f"{name}_ms"] = 1e3 * median_seconds(lambda: fn(x, a, b), args.repeats)
        row["ratio"] = row["in_out_ms"] / row["out_in_ms"]
        rows.append(row)
        print(f"{r:>4} {row['in_out_ms']:>10.2f} {row['out_in_ms']:>10.2f} {row['feature_major_ms']:>17.2f} "
              f"{row['out_in_right_ms']:>11.2f} {row['ratio']:>14.2f}", flush=True)
    write_result(args.out, width=D, intermediate=F, layers=args.layers, rows=rows)


if __name__ == "__main__":
    main()
