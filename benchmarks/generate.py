"""Plain decoding speed of SmolLM2-135M-Instruct: prefill time and decode tokens/s per batch size.

    python benchmarks/generate.py [--batch 1 8] [--prefill 128] [--new-tokens 64] [--out FILE]

Plain (greedy) decoding through the speculative engine's `mode='none'`. Decode time is the time of
prefill + the jitted while-loop minus the prefill time (medians after a warm-up call), over
`--new-tokens` steps with EOS disabled, so tokens/s = batch * steps / seconds. Prints a table and
writes JSON.
"""

import argparse

import jax
import numpy as np

from bebop_jax.batching import cache_length_for
from bebop_jax.speculative import decode, prefill
from bebop_jax.model import load_model
from timing import median_seconds, write_result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/generate.json")
    args = ap.parse_args()

    model = load_model(args.model)
    rows = []
    for batch in args.batch:
        tokens = np.random.RandomState(0).randint(100, 20000, size=(batch, args.prefill)).astype(np.int32)
        lengths = np.full((batch,), args.prefill, np.int32)
        kw = dict(cfg=model.cfg, mtp_cfg=None, num_draft=0, greedy=True, top_p=1.0, eos_ids=())
        cache_len = cache_length_for(args.prefill, args.new_tokens, extra=2)
        t = jax.numpy.float32(1.0)
        run_prefill = lambda: prefill(model.params, None, tokens, lengths, jax.random.key(0), t,  # noqa: E731
                                      max_new_tokens=args.new_tokens, cache_len=cache_len, **kw).tokens
        prefill_s = median_seconds(run_prefill, args.repeats)
        run_decode = lambda: decode(model.params, None, prefill(  # noqa: E731
            model.params, None, tokens, lengths, jax.random.key(0), t, max_new_tokens=args.new_tokens,
            cache_len=cache_len, **kw), t, **kw).tokens
        total_s = median_seconds(run_decode, args.repeats)
        decode_s = total_s - prefill_s
        steps = args.new_tokens - 1
        rows.append(dict(batch=batch, prefill_tokens=args.prefill, prefill_ms=1e3 * prefill_s,
                         decode_ms_per_step=1e3 * decode_s / steps, decode_tokens_per_s=batch * steps / decode_s))
    print(f"{'batch':>5} {'prefill ms':>11} {'decode ms/step':>15} {'decode tok/s':>13}")
    for r in rows:
        print(f"{r['batch']:>5} {r['prefill_ms']:>11.1f} {r['decode_ms_per_step']:>15.1f} {r['decode_tokens_per_s']:>13.1f}")
    write_result(args.out, model=args.model, rows=rows)


if __name__ == "__main__":
    main()
