"""``tmjax generate``: run your own prompts through a checkpoint, dense or TriangleMix.

One prompt (``--prompt`` / ``--prompt-file``): the new tokens stream to stdout as they are decoded;
prefill time and decode speed follow on stderr. A JSONL file (``--jsonl``, one prompt per line):
prompts are grouped into batches whose lengths share a bucket (one compiled program per batch
shape), a progress bar runs on stderr, and one JSON line per prompt is written (to ``--out`` or
stdout) as each batch finishes, each line whole and flushed, so an interrupted run keeps every
finished line. Every argument, input line and prompt length is checked before the weights load.

(The module is not named ``generate``: importing ``tmjax.generate`` would hide the function
``tmjax.generate`` behind the submodule.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tmjax import interrupts

PROG = "tmjax generate"
# The keys of each output line; an input object's other keys are copied beside them, so these are refused.
OUTPUT_KEYS = ("line", "text", "prompt_tokens", "new_tokens", "finish", "prefill_s", "decode_tokens_per_s",
               "batch_size", "includes_compile")


@dataclasses.dataclass
class Prompt:
    """One prompt: where it came from (1-based line of the JSONL file, else 1), its text, the fields
    to echo back (a JSONL object's other keys) and, once tokenized, its token ids."""

    line: int
    text: str
    extra: dict
    ids: list[int] = dataclasses.field(default_factory=list)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder written by `tmjax convert`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", type=Path, help="a UTF-8 file holding one prompt")
    source.add_argument("--jsonl", type=Path,
                        help='one prompt per line: a JSON string, or an object with a "prompt" string (its other '
                             "keys are copied to the output line; keys the output writes are refused)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    parser.add_argument("--switch-layer", type=int, default=None,
                        help="first Triangle layer (TriangleMix); default: dense attention in every layer")
    parser.add_argument("--n-init", type=int, default=8)
    parser.add_argument("--n-local", type=int, default=512)
    parser.add_argument("--n-last", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    parser.add_argument("--batch-size", type=int, default=8, help="most prompts per batch (--jsonl)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="cast the weights on load (default: as stored)")
    parser.add_argument("--kv-dtype", default=None,
                        help="KV cache dtype: float32, bfloat16, float16, float8_e4m3fn or int8 (one byte per number "
                             "with per-vector scales; default: the weights' dtype)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="tokens per chunk of prefill's per-token stages (default: the model's, tmjax.memory)")
    parser.add_argument("--out", type=Path, help="write the JSON lines here (a new file) instead of stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


# --- checks before loading ------------------------------------------------------------------------------

def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory, not a file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be read: {err.strerror}") from None


def _jsonl_prompts(path: Path) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(_read_text(path, "--jsonl").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if isinstance(item, dict):
            text = item.get("prompt")
            if not isinstance(text, str):
                raise ValueError(f'{path}:{number}: the object needs a "prompt" string')
            extra = {key: value for key, value in item.items() if key != "prompt"}
            clash = [key for key in OUTPUT_KEYS if key in extra]
            if clash:
                raise ValueError(f"{path}:{number}: key {clash[0]!r} is one the output line writes (with "
                                 f"{', '.join(OUTPUT_KEYS)}); rename it so that it is copied, not overwritten")
        elif isinstance(item, str):
            text, extra = item, {}
        else:
            raise ValueError(f'{path}:{number}: expected a JSON string or an object with a "prompt" string, '
                             f"got {type(item).__name__}")
        if not text.strip():
            raise ValueError(f"{path}:{number}: the prompt is empty")
        prompts.append(Prompt(number, text, extra))
    if not prompts:
        raise ValueError(f"--jsonl {path} holds no prompts")
    return prompts


def _check_args(args: argparse.Namespace) -> None:
    for name, low in (("max_new_tokens", 1), ("batch_size", 1), ("n_init", 0), ("n_local", 1), ("n_last", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not -2**63 <= args.seed < 2**63:  # what jax.random.key takes
        raise ValueError(f"--seed must be in [-2**63, 2**63 - 1] (a 64-bit integer), got {args.seed}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.out is not None:
        if args.out.exists():
            raise ValueError(f"--out {args.out} already exists; choose a new file (lines are never overwritten)")
        if not args.out.parent.is_dir() or not os.access(args.out.parent, os.W_OK):
            raise ValueError(f"--out {args.out}: {args.out.parent} is not a writable directory")


def _prompts(args: argparse.Namespace) -> list[Prompt]:
    if args.jsonl is not None:
        return _jsonl_prompts(args.jsonl)
    text = args.prompt if args.prompt is not None else _read_text(args.prompt_file, "--prompt-file")
    if not text.strip():
        raise ValueError("the prompt is empty")
    return [Prompt(1, text, {})]


def _layout(args: argparse.Namespace, num_layers: int) -> Any:
    from tmjax.layout import TriangleMix

    if args.switch_layer is None:
        return None
    if not 0 <= args.switch_layer <= num_layers:
        raise ValueError(f"--switch-layer must be in 0..{num_layers} (the model has {num_layers} layers), "
                         f"got {args.switch_layer}")
    return TriangleMix(args.switch_layer, n_init=args.n_init, n_local=args.n_local, n_last=args.n_last)


def _tokenize(tokenizer: Any, prompts: list[Prompt], chat: bool) -> None:
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: this checkpoint's tokenizer has no chat template")
    for prompt in prompts:
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], tokenize=False,
                                                 add_generation_prompt=True)
            prompt.ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            prompt.ids = tokenizer(prompt.text)["input_ids"]
        if not prompt.ids:
            raise ValueError(f"line {prompt.line}: the prompt encodes to no tokens")


def _check_lengths(config: Any, layout: Any, prompts: list[Prompt]) -> None:
    from tmjax.plan import check_windows

    for prompt in prompts:
        try:
            check_windows(config, layout, len(prompt.ids))
        except ValueError as err:
            raise ValueError(f"line {prompt.line}: {err}" if len(prompts) > 1 else str(err)) from None


# --- output ------------------------------------------------------------------------------------------------

class LineWriter:
    """Writes whole JSON lines: to a new file with one ``write`` call per line (a signal cannot split
    it), or to stdout, flushed. The file is created with its first line, so a run stopped or crashed
    before any prompt finished leaves no empty file behind (and its rerun is not refused)."""

    def __init__(self, path: Path | None, stream: TextIO) -> None:
        self._path = path
        self._fd: int | None = None
        self._stream = stream
        self.written = 0

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with interrupts.deferred():  # a signal takes effect once the line is out and counted
            if self._path is None:
                self._stream.write(line)
                self._stream.flush()
            else:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
                data = line.encode("utf-8")
                while data:
                    data = data[os.write(self._fd, data):]
            self.written += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _finished(tokens: list[int], eos: int | None) -> tuple[list[int], str]:
    """The generated tokens up to and including the first EOS, and why generation stopped."""
    if eos is not None and eos in tokens:
        return tokens[:tokens.index(eos) + 1], "eos"
    return tokens, "length"


def _record(prompt: Prompt, text: str, new_tokens: int, finish: str, prefill_s: float,
            tokens_per_s: float | None, batch: int, compiled: bool) -> dict:
    ours = {"line": prompt.line, "text": text, "prompt_tokens": len(prompt.ids), "new_tokens": new_tokens,
            "finish": finish, "prefill_s": round(prefill_s, 4),
            "decode_tokens_per_s": None if tokens_per_s is None else round(tokens_per_s, 2),
            "batch_size": batch, "includes_compile": compiled}
    return {**prompt.extra, **ours}


# --- running --------------------------------------------------------------------------------------------

def _stream_one(params: Any, tokenizer: Any, prompt: Prompt, layout: Any, args: argparse.Namespace,
                writer: LineWriter | None) -> None:
    """Prefill, then decode step by step, printing the text as it grows (the same tokens as
    ``tmjax.generate`` with these arguments)."""
    import jax
    import numpy as np

    import tmjax

    eos = tokenizer.eos_token_id
    key = jax.random.key(args.seed)

    def pick(logits: jax.Array) -> int:
        nonlocal key
        key, sub = jax.random.split(key)
        if args.temperature > 0:
            return int(jax.random.categorical(sub, logits / args.temperature))
        return int(np.argmax(np.asarray(logits)))

    start = time.perf_counter()
    logits, cache = tmjax.prefill(params, np.asarray(prompt.ids, np.int32), layout, max_new_tokens=args.max_new_tokens,
                                  kv_dtype=args.kv_dtype, chunk=args.chunk)
    tokens = [pick(logits)]
    prefill_s = time.perf_counter() - start
    shown = ""
    decode_start = None
    while True:
        text = tokenizer.decode(_finished(tokens, eos)[0], skip_special_tokens=True)
        if text.startswith(shown) and not text.endswith("\ufffd"):  # wait for whole characters
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
        if tokens[-1] == eos or len(tokens) == args.max_new_tokens:
            break
        logits, cache = tmjax.decode_step(params, np.int32(tokens[-1]), cache, donate=True)
        tokens.append(pick(logits))
        if decode_start is None:  # the first step compiled the decode program: time the steps after it
            decode_start, timed_from = time.perf_counter(), len(tokens)
    sys.stdout.write("\n")
    steps = 0 if decode_start is None else len(tokens) - timed_from
    decode_s = 0.0 if decode_start is None else time.perf_counter() - decode_start
    speed = steps / decode_s if steps and decode_s > 0 else None
    print(f"{PROG}: {len(prompt.ids)} prompt tokens, {len(tokens)} new; prefill {prefill_s:.2f} s (first call, "
          f"includes compiling); decode " + ("n/a (too few tokens to time)" if speed is None else f"{speed:.1f} tok/s"),
          file=sys.stderr)
    if writer is not None:
        kept, finish = _finished(tokens, eos)
        writer.write(_record(prompt, shown, len(kept), finish, prefill_s, speed, 1, True))


def _batches(prompts: list[Prompt], batch_size: int) -> list[list[Prompt]]:
    """Prompts grouped by the bucket of their length, in chunks of at most ``batch_size``."""
    from tmjax.api import bucket_length

    buckets: dict[int, list[Prompt]] = {}
    for prompt in prompts:
        buckets.setdefault(bucket_length(len(prompt.ids)), []).append(prompt)
    return [group[i:i + batch_size] for group in buckets.values() for i in range(0, len(group), batch_size)]


def _run_batches(params: Any, tokenizer: Any, prompts: list[Prompt], layout: Any, args: argparse.Namespace,
                 writer: LineWriter) -> None:
    import jax
    import numpy as np
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tmjax import api

    eos = tokenizer.eos_token_id
    key = jax.random.key(args.seed)
    seen_shapes = set()
    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=args.quiet) as progress:
        task = progress.add_task("generate", total=len(prompts))
        for batch in _batches(prompts, args.batch_size):
            shape = (len(batch), api.bucket_length(max(len(p.ids) for p in batch)))
            compiled = shape not in seen_shapes
            seen_shapes.add(shape)
            key, sub = jax.random.split(key)
            start = time.perf_counter()
            logits, cache = api.prefill(params, [np.asarray(p.ids, np.int32) for p in batch], layout,
                                        max_new_tokens=args.max_new_tokens, kv_dtype=args.kv_dtype, chunk=args.chunk)
            jax.block_until_ready(logits)
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            out = np.asarray(api.generate_from(params, logits, cache, args.max_new_tokens,
                                               temperature=args.temperature, key=sub, eos_token_id=eos))
            decode_s = time.perf_counter() - start
            for prompt, row in zip(batch, out.tolist()):
                kept, finish = _finished(row, eos)
                text = tokenizer.decode(kept, skip_special_tokens=True)
                speed = len(kept) / decode_s if decode_s > 0 else None
                writer.write(_record(prompt, text, len(kept), finish, prefill_s, speed, len(batch), compiled))
            progress.advance(task, len(batch))
            interrupts.check()  # a signal whose exception jax swallowed (e.g. in a gc callback)


@dataclasses.dataclass
class Run:
    """What a run has got to, for the message when it stops early."""

    prompts: list[Prompt] = dataclasses.field(default_factory=list)
    writer: LineWriter | None = None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tmjax generate``; returns the process exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error (argparse has printed it)
        return int(exit_.code or 0)
    run = Run()
    try:
        with interrupts.handled():  # SIGINT and SIGTERM stop alike; finished lines stay
            _generate(args, run)
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        done = 0 if run.writer is None else run.writer.written
        where = f"; {args.out} holds their lines" if args.out is not None and done else ""
        print(f"{PROG}: interrupted after {done} of {len(run.prompts)} prompts{where}", file=sys.stderr)
        return interrupts.exit_code(err)
    finally:
        if run.writer is not None:
            run.writer.close()
    return 0


def _generate(args: argparse.Namespace, run: Run) -> None:
    """Check every input, then load the model and run the prompts."""
    from tmjax import checkpoint
    from tmjax.api import check_new_tokens

    _check_args(args)
    run.prompts = _prompts(args)
    checkpoint.read_meta(args.checkpoint)
    config = checkpoint.read_config(args.checkpoint)
    check_new_tokens(config, args.max_new_tokens, "--max-new-tokens")
    layout = _layout(args, config.num_layers)
    tokenizer = checkpoint.tokenizer(args.checkpoint)
    _tokenize(tokenizer, run.prompts, args.chat)
    _check_lengths(config, layout, run.prompts)
    params = checkpoint.load(args.checkpoint, dtype=args.dtype)
    run.writer = None if args.out is None and args.jsonl is None else LineWriter(args.out, sys.stdout)
    if args.jsonl is None:
        _stream_one(params, tokenizer, run.prompts[0], layout, args, run.writer)
    else:
        _run_batches(params, tokenizer, run.prompts, layout, args, run.writer)
