"""The ``tmjax`` command: one subcommand per job, each parsed by the module that does the job."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, entry function, one-line help). Modules are imported only when their
# subcommand runs, so `tmjax --help` does not import jax.
SUBCOMMANDS = {
    "convert": ("tmjax.convert.cli", "main", "convert a Hugging Face folder or a GGUF file into a tmjax checkpoint"),
    "demo": ("tmjax.demo", "main", "long-prompt retrieval on SmolLM2-135M-Instruct: dense vs TriangleMix"),
    "probe": ("tmjax.probe", "probe_main", "gradient probe: per-layer section importances and a switch layer"),
    "eval": ("tmjax.evaluate", "eval_main", "long-context accuracy: dense vs TriangleMix at several switch layers"),
    "calibrate": ("tmjax.calibrate", "calibrate_main", "the earliest switch layer whose measured divergence from dense meets a target"),
}


def _usage() -> str:
    lines = ["usage: tmjax <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `tmjax <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"tmjax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function, _ = SUBCOMMANDS[name]
    entry = getattr(importlib.import_module(module_name), function)
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
