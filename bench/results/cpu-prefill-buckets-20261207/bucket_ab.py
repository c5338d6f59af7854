"""Scratch A/B: dense and TriangleMix(22) prefill of the demo's 3858-token prompt padded by the old bucket
rule (4096) and the new one (3968), compiled ahead and interleaved, medians."""
import statistics, sys, time
import numpy as np, jax
import tmjax
from tmjax import api
sys.path.insert(0, "bench")
from tmjax.default_model import smollm2_checkpoint
from tmjax.checkpoint import tokenizer as load_tokenizer
from tmjax.demo import build_prompt
new_rule = api.bucket_length
old_rule = lambda n: api._round_up(n, 128) if n <= 1024 else api._round_up(n, 2 ** (n.bit_length() - 4))
path = smollm2_checkpoint("float32")
params, tok = tmjax.load(path), load_tokenizer(path)
tokens = np.asarray(tok.encode(build_prompt(tok, 4000, depth=0.4, seed=0)[0]), np.int32)[None]
systems, outs = {}, {}
for rule_name, rule in (("old", old_rule), ("new", new_rule)):
    api.bucket_length = rule
    for name, layout in (("dense", None), ("tm22", tmjax.TriangleMix(22))):
        _, batch, lens, _, cache_size, _ = api._prepare(params, tokens, None, layout, None, 0, minimum=0)
        c = jax.jit(lambda p, t, n, layout=layout, cs=cache_size: api._prefill_logits(p, t, n, layout, None, cs, None)[0]
                    ).lower(params, batch, lens).compile()
        systems[f"{name} {rule_name} T={batch.shape[1]}"] = (c, batch, lens)
api.bucket_length = new_rule
times = {k: [] for k in systems}
for k, (c, b, l) in systems.items():
    outs[k] = np.asarray(c(params, b, l))
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
    for k, (c, b, l) in systems.items():
        t0 = time.perf_counter(); np.asarray(c(params, b, l)); times[k].append(time.perf_counter() - t0)
for k, v in times.items():
    print(f"{k}: median {statistics.median(v):.2f} s {[round(x, 2) for x in v]}")
keys = list(outs)
print("max |logit diff| dense old/new", float(np.abs(outs[keys[0]] - outs[keys[2]]).max()),
      "tm", float(np.abs(outs[keys[1]] - outs[keys[3]]).max()))
