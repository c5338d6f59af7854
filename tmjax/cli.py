"""The ``tmjax`` command: one subcommand per job, each parsed by the module that does the job.

Subcommand modules are imported only when their subcommand runs, and the ``tmjax`` package imports
its API lazily, so ``tmjax --help`` and ``tmjax --version`` import no jax.
"""

from __future__ import annotations

import importlib
import sys

from tmjax import interrupts

# subcommand -> (module, entry function, one-line help).
SUBCOMMANDS = {
    "convert": ("tmjax.convert.cli", "main", "convert a Hugging Face folder or a GGUF file into a tmjax checkpoint"),
    "generate": ("tmjax.generate_cli", "main", "run your prompts (one, or a JSONL file in batches) through a checkpoint"),
    "demo": ("tmjax.demo", "main", "long-prompt retrieval on SmolLM2-135M-Instruct: dense vs TriangleMix"),
    "probe": ("tmjax.probe", "probe_main", "gradient probe: per-layer section importances and a switch layer"),
    "eval": ("tmjax.evaluate", "eval_main", "long-context accuracy: dense vs TriangleMix at several switch layers"),
    "calibrate": ("tmjax.calibrate", "calibrate_main", "the earliest switch layer whose measured divergence from dense meets a target"),
}


def _usage() -> str:
    lines = ["usage: tmjax <command> [options]", "       tmjax --version", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `tmjax <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; SIGINT/SIGTERM end any of them with one line and 128 + the signal."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from tmjax import __version__

        print(f"tmjax {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"tmjax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function, _ = SUBCOMMANDS[name]
    with interrupts.handled():
        try:
            entry = getattr(importlib.import_module(module_name), function)
            return int(entry(rest) or 0)
        except KeyboardInterrupt as err:
            print(f"tmjax {name}: interrupted", file=sys.stderr)
            return interrupts.exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
