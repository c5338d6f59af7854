"""The gradient probe that chooses TriangleMix's switch layer.

For prompts with known answers, it measures in every layer of the *dense* model how much the loss on
the answer (negative log-likelihood of its first token; optionally of all its tokens) depends on each
entry ``P[h, i, j]`` of the softmax attention matrix, averaged over three sections of that matrix:

- ``streaming``: the entries a Triangle layer keeps for every row (sinks ``j < n_init`` and the local
  window ``i - j < n_local``);
- ``last``: the other entries of the last ``n_last`` rows (Triangle keeps them too);
- ``middle``: the rest of the causal matrix, which a Triangle layer drops.

How the gradient is taken. Attention output row ``i`` is ``O[i] = sum_j P[i, j] V[j]``, so by the
chain rule ``dL/dP[i, j] = <dL/dO[i], V[j]>`` exactly. The probe therefore differentiates with respect
to a zero perturbation added to every layer's attention output (one ``[T, Hq, D]`` array per layer),
takes ``V`` from the KV cache, and forms the ``T x T`` gradients block by block only to reduce them to
three sums per layer. This is the same gradient as autodiff through a materialised ``P``, but the
backward pass stores no ``T x T`` matrices, so it fits 8K tokens on one GPU. The attention itself is
dense float32 softmax attention (rematerialised in the backward pass); the tests check the gradients
against finite differences through an explicitly materialised ``P``.

Switch-layer rule (``RULE`` below, also written into the JSON): normalise the middle curve by its
maximum over layers; the recommended switch layer is the smallest ``s`` such that every layer
``l >= s`` has a normalised middle importance at most ``threshold``. ``s == num_layers`` (all dense)
when the last layer is above the threshold. The JSON also gives the whole curve read other ways, for
comparing the rule with a calibrated layer (``tmjax calibrate``): for each layer, the range of
thresholds that would pick it (``threshold_ranges``; none for a layer the rule can never pick), and
the share of the summed middle importance in layers ``>= s`` (``middle_share_from``), which is what
switching at ``s`` drops if each layer's importance counted once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tmjax import tasks
from tmjax.api import bucket_length
from tmjax.evaluate import (add_task_arguments, load_model, output_folder, run_cli, save_figure, task_list,
                            write_atomically)
from tmjax.layout import TriangleMix
from tmjax.models import decoder
from tmjax.models.params import Params
from tmjax.models.rope import rope_tables

SECTIONS = ("streaming", "last", "middle")
DEFAULT_THRESHOLD = 0.1
RULE = ("smallest layer s such that middle[l] / max(middle) <= threshold for every layer l >= s "
        "(num_layers, i.e. all dense, if the last layer is above the threshold)")
_BLOCK_ROWS = 128  # query rows per block when reducing dL/dP


def entry_gradients(grad_out: jax.Array, v: jax.Array) -> jax.Array:
    """``dL/dP`` for one layer, float32 ``[B, Hq, T, S]``, from ``grad_out = dL/dO`` ``[B, T, Hq, D]``
    and ``v`` ``[B, S, Hkv, D]`` (GQA: KV head ``j`` serves query heads ``[j*g, (j+1)*g)``).

    Materialises ``T x S`` per head: for small prompts and tests; the probe uses ``section_sums``.
    """
    b, t, hq, d = grad_out.shape
    hkv = v.shape[2]
    go = grad_out.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
    out = jnp.einsum("bthgd,bshd->bhgts", go, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return out.reshape(b, hq, t, v.shape[1])


def section_sums(grad_out: jax.Array, v: jax.Array, length: int | jax.Array, *, n_init: int, n_local: int,
                 n_last: int) -> tuple[jax.Array, jax.Array]:
    """Sum of ``|dL/dP|`` and number of entries in each section (order ``SECTIONS``) for one layer.

    ``grad_out`` ``[B, T, Hq, D]``, ``v`` ``[B, T, Hkv, D]``; ``length`` is the real sequence length
    (rows and keys at or beyond it are padding and ignored). Works on ``_BLOCK_ROWS`` query rows at a
    time, so memory is ``O(B * Hq * T * _BLOCK_ROWS)``. Returns two float32 arrays of shape ``[3]``.
    """
    b, t, hq, d = grad_out.shape
    hkv = v.shape[2]
    rows = -(-t // _BLOCK_ROWS) * _BLOCK_ROWS
    go = jnp.pad(grad_out.astype(jnp.float32), ((0, 0), (0, rows - t), (0, 0), (0, 0)))
    go = go.reshape(b, rows, hkv, hq // hkv, d)
    vf = v.astype(jnp.float32)
    keys = jnp.arange(t)[None, :]

    def block(start: jax.Array) -> tuple[jax.Array, jax.Array]:
        g = lax.dynamic_slice_in_dim(go, start, _BLOCK_ROWS, axis=1)
        grads = jnp.abs(jnp.einsum("brhgd,bshd->bhgrs", g, vf, precision=lax.Precision.HIGHEST))
        i = (start + jnp.arange(_BLOCK_ROWS))[:, None]
        causal = (keys <= i) & (i < length)
        streaming = causal & ((keys < n_init) | (i - keys < n_local))
        last = causal & ~streaming & (i >= length - n_last)
        middle = causal & ~streaming & ~last
        masks = (streaming, last, middle)
        sums = jnp.stack([jnp.sum(jnp.where(m, grads, 0.0)) for m in masks])
        counts = jnp.stack([jnp.sum(m, dtype=jnp.float32) for m in masks]) * (b * hq)
        return sums, counts

    sums, counts = lax.map(block, jnp.arange(0, rows, _BLOCK_ROWS))
    return sums.sum(axis=0), counts.sum(axis=0)


def _dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: jax.Array) -> jax.Array:
    """Dense causal softmax attention (XLA, GQA-native), limited to a sliding ``window`` where > 0."""
    i = jnp.arange(q.shape[1])[:, None]
    j = jnp.arange(k.shape[1])[None, :]
    mask = (j <= i) & ((window == 0) | (i - j < window))
    return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], implementation="xla")


def attention_output_grads(params: Params, tokens: jax.Array, length: jax.Array, positions: jax.Array,
                           targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Loss and the per-layer ``dL/dO`` and ``V`` of the dense model over ``tokens [B, T]``.

    The loss is the ``weights``-weighted mean negative log-likelihood of ``targets [B, A]`` predicted at
    ``positions [B, A]``; ``length`` is the real length (RoPE scaling that depends on it; padding
    after it is hidden by causality). Returns ``(loss, grad_out [L, B, T, Hq, D], v [L, B, T, Hkv, D])``.

    The layers run as a ``lax.scan`` over the stacked weights with the perturbations and windows as
    scanned inputs and ``V`` as the scanned output: the decoder's own loop also carries a KV cache,
    which makes its backward pass several times slower.
    """
    c, w = params.config, params.weights
    b, t = tokens.shape
    zeros = jnp.zeros((c.num_layers, b, t, c.num_heads, c.head_dim), jnp.float32)
    windows = jnp.asarray([c.layer_window(i) or 0 for i in range(c.num_layers)], jnp.int32)
    cos, sin = rope_tables(c, jnp.arange(t), seq_len=length)
    layer = decoder.DecoderLayer(c)
    attend_dense = jax.checkpoint(_dense_attention)

    def loss_fn(perturbation: jax.Array) -> tuple[jax.Array, jax.Array]:
        def step(x: jax.Array, per_layer: tuple) -> tuple[jax.Array, jax.Array]:
            layer_weights, delta, window = per_layer

            def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
                return attend_dense(q, k, v, window) + delta.astype(q.dtype), v

            return layer.apply({"params": layer_weights}, x, cos, sin, attend)

        x = jnp.take(w["embed_tokens"]["embedding"], tokens, axis=0)
        hidden, v = lax.scan(step, x, (w["layers"], perturbation, windows))
        picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)
        logp = jax.nn.log_softmax(decoder.logits(params, picked), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * weights) / jnp.sum(weights), v

    (loss, v), grad_out = jax.value_and_grad(loss_fn, has_aux=True)(zeros)
    return loss, grad_out, v


@functools.partial(jax.jit, static_argnames=("n_init", "n_local", "n_last"))
def _probe_one(params: Params, tokens: jax.Array, length: jax.Array, positions: jax.Array, targets: jax.Array,
               weights: jax.Array, n_init: int, n_local: int, n_last: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    with jax.default_matmul_precision("float32"):  # no TF32 on GPUs: gradients of small entries matter
        loss, grad_out, v = attention_output_grads(params, tokens, length, positions, targets, weights)
    sums, counts = lax.map(
        lambda gv: section_sums(gv[0], gv[1], length, n_init=n_init, n_local=n_local, n_last=n_last),
        (grad_out, v),
    )
    return loss, sums, counts


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Per-layer mean ``|dL/dP|`` of each section (``[L]`` arrays), averaged over prompts."""

    streaming: np.ndarray
    last: np.ndarray
    middle: np.ndarray
    losses: tuple[float, ...]
    switch_layer: int
    threshold: float

    def to_json(self) -> dict:
        return {
            "sections": {name: getattr(self, name).tolist() for name in SECTIONS},
            "middle_normalised": (self.middle / max(float(np.max(self.middle)), 1e-30)).tolist(),
            "threshold_ranges": threshold_ranges(self.middle),
            "middle_share_from": middle_share_from(self.middle).tolist(),
            "recommended_switch_layer": self.switch_layer,
            "rule": RULE,
            "threshold": self.threshold,
            "num_prompts": len(self.losses),
            "losses": list(self.losses),
        }


def recommend_switch_layer(middle: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> int:
    """The switch layer chosen by ``RULE`` from the per-layer middle importances."""
    curve = np.asarray(middle, np.float64)
    if curve.ndim != 1 or curve.size == 0 or not np.all(np.isfinite(curve)) or np.any(curve < 0):
        raise ValueError(f"middle must be a non-empty 1-D array of finite values >= 0, got {curve!r}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    peak = curve.max()
    below = curve <= threshold * peak if peak > 0 else np.ones_like(curve, bool)
    switch = curve.size
    while switch > 0 and below[switch - 1]:
        switch -= 1
    return switch


def threshold_ranges(middle: Sequence[float]) -> list[list[float] | None]:
    """For each switch layer ``s`` in ``0..L`` (``L`` = all dense): ``[low, high]`` such that
    ``recommend_switch_layer(middle, t) == s`` exactly for ``low <= t < high`` (``t`` in (0, 1)), or
    None when no threshold picks ``s``. The bounds are suffix maxima of the normalised curve: ``s`` is
    picked when every layer from ``s`` on is at most ``t`` and layer ``s - 1`` is above it."""
    curve = np.asarray(middle, np.float64)
    peak = float(curve.max())
    if peak == 0:  # every threshold picks layer 0
        return [[0.0, 1.0]] + [None] * curve.size
    suffix_max = [float(curve[s:].max()) / peak for s in range(curve.size)] + [0.0]
    # s is picked for suffix_max[s] <= t < suffix_max[s - 1]; nothing picks 0 since t < 1 = suffix_max[0]
    return [None] + [[suffix_max[s], suffix_max[s - 1]] if suffix_max[s] < suffix_max[s - 1] else None
                     for s in range(1, curve.size + 1)]


def middle_share_from(middle: Sequence[float]) -> np.ndarray:
    """``[L + 1]``: the share of ``sum(middle)`` in layers ``>= s`` (1 at ``s = 0``, 0 at ``s = L``)."""
    curve = np.asarray(middle, np.float64)
    tail = np.concatenate([np.cumsum(curve[::-1])[::-1], [0.0]])
    return tail / tail[0] if tail[0] > 0 else tail


def probe(params: Params, examples: Sequence[tuple[Sequence[int], Sequence[int]]], *, n_init: int = 8,
          n_local: int = 512, n_last: int = 128, all_answer_tokens: bool = False,
          threshold: float = DEFAULT_THRESHOLD) -> ProbeResult:
    """Section importances over ``examples`` (``(prompt_ids, answer_ids)`` pairs) and the switch layer.

    ``n_init``, ``n_local`` and ``n_last`` are the Triangle sizes that define the sections. Each
    prompt is probed alone (padded to its ``bucket_length``) in float32; the result is the mean over
    prompts of each prompt's per-section mean. A section with no entry in a prompt (e.g. ``middle``
    when the prompt is shorter than the window) is left out of that prompt's average.
    """
    if not examples:
        raise ValueError("probe needs at least one (prompt_ids, answer_ids) example, got none")
    TriangleMix(switch_layer=0, n_init=n_init, n_local=n_local, n_last=n_last)  # validates the sizes
    params = Params(params.config, jax.tree.map(lambda w: w.astype(jnp.float32), params.weights))
    per_prompt, losses = [], []
    for prompt_ids, answer_ids in examples:
        if len(prompt_ids) == 0 or len(answer_ids) == 0:
            raise ValueError(f"empty prompt or answer (lengths {len(prompt_ids)}, {len(answer_ids)})")
        scored = list(answer_ids) if all_answer_tokens else [answer_ids[0]]
        ids = list(prompt_ids) + scored[:-1]
        padded = bucket_length(len(ids))
        tokens = np.zeros((1, padded), np.int32)
        tokens[0, :len(ids)] = ids
        n_scored = max(8, 1 << (len(scored) - 1).bit_length())  # a few static shapes, not one per length
        positions = np.zeros((1, n_scored), np.int32)
        targets = np.zeros((1, n_scored), np.int32)
        weights = np.zeros((1, n_scored), np.float32)
        positions[0, :len(scored)] = np.arange(len(prompt_ids) - 1, len(ids))
        targets[0, :len(scored)] = scored
        weights[0, :len(scored)] = 1.0
        loss, sums, counts = _probe_one(params, tokens, jnp.int32(len(ids)), positions, targets, weights,
                                        n_init=n_init, n_local=n_local, n_last=n_last)
        sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
        per_prompt.append(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan))
        losses.append(float(loss))
    stacked = np.stack(per_prompt)  # [prompts, L, 3]
    if np.isnan(stacked[:, :, 2]).all():
        raise ValueError(f"no prompt has a middle section: prompts must be longer than n_local + n_last "
                         f"({n_local} + {n_last})")
    means = np.nanmean(stacked, axis=0)
    return ProbeResult(means[:, 0], means[:, 1], means[:, 2], tuple(losses),
                       recommend_switch_layer(means[:, 2], threshold), threshold)


def plot(result: ProbeResult, path: Path, title: str) -> None:
    """The three section curves over layers (log scale) with the recommended switch layer marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    layers = np.arange(result.middle.size)
    for name, style in zip(SECTIONS, ("-o", "-s", "-^")):
        ax.plot(layers, getattr(result, name), style, markersize=3, label=name)
    ax.axvline(result.switch_layer - 0.5, color="grey", linestyle="--",
               label=f"recommended switch layer {result.switch_layer}")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean |dL / d attention entry|")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def probe_main(argv: Sequence[str] | None = None) -> int:
    """``tmjax probe``: writes ``probe.json`` and ``probe.png`` to ``--out``; prints the switch layer."""
    parser = argparse.ArgumentParser(prog="tmjax probe", description=__doc__.splitlines()[0])
    add_task_arguments(parser, samples_per_task=2, default_tasks=tasks.TASKS)
    parser.add_argument("--all-answer-tokens", action="store_true",
                        help="loss over every answer token (default: the answer's first token only)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"switch-layer rule threshold (default {DEFAULT_THRESHOLD}): {RULE}")
    return run_cli("tmjax probe", parser, _probe_cli, argv)


def _probe_cli(args: argparse.Namespace) -> int:
    names = task_list(args.tasks)
    out = output_folder(args.out)
    if not 0 < args.threshold < 1:
        raise ValueError(f"--threshold must be in (0, 1), got {args.threshold}")
    sizes = dict(n_init=args.n_init, n_local=args.n_local, n_last=args.n_last)
    params, tokenizer, name = load_model(args.checkpoint)
    max_tokens = args.max_tokens or params.config.max_position_embeddings
    started = time.perf_counter()
    samples = tasks.generate_suite(names, samples_per_task=args.samples_per_task, seed=args.seed,
                                   max_tokens=max_tokens, count=tasks.token_counter(tokenizer))
    examples = [tasks.encode(tokenizer, s) for s in samples]
    result = probe(params, [(e.prompt_ids, e.answer_ids) for e in examples], **sizes,
                   all_answer_tokens=args.all_answer_tokens, threshold=args.threshold)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": name,
        "num_layers": params.config.num_layers,
        "loss": "all answer tokens" if args.all_answer_tokens else "first answer token",
        "gradient": "mean |dL/dP| over the section's entries, P = softmax attention (dense model)",
        "triangle": sizes,
        "tasks": names,
        "samples_per_task": args.samples_per_task,
        "seed": args.seed,
        "prompt_tokens": [len(e.prompt_ids) for e in examples],
        "seconds": round(time.perf_counter() - started, 1),
        **result.to_json(),
    }
    write_atomically(out / "probe.json", json.dumps(report, indent=2))
    plot(result, out / "probe.png", f"{name}: gradient probe over {len(examples)} prompts")
    print(f"recommended switch layer: {result.switch_layer} of {params.config.num_layers} ({RULE}, "
          f"threshold {args.threshold}); wrote {out / 'probe.json'} and {out / 'probe.png'}")
    return 0
