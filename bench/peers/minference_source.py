"""The authors' MInference (github.com/microsoft/MInference), loaded from a source folder under transformers 5.x.

The folder is an export of their repository (``minference/``, ``csrc/``; a ``COMMIT`` file names the
commit) kept outside this repository (``.carry/minference``, ignored by git). Its files are never edited:
what it needs to run here is patched at run time, and every patch is appended to ``PATCHES`` so the
record of a run says exactly what differs from the authors' own environment (transformers 4.x,
flash_attn, setup.py's compiled ``minference.cuda``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import time
import types
from pathlib import Path
from typing import Callable

ORIGIN = "https://github.com/microsoft/MInference"
PATCHES: list[str] = []


def check_folder(folder: str | Path) -> Path:
    """The source folder as a Path; a one-line error naming what is missing."""
    path = Path(folder)
    for part in ("minference/__init__.py", "minference/modules/tri_mix.py", "csrc/kernels.cpp",
                 "csrc/vertical_slash_index.cu"):
        if not (path / part).is_file():
            raise SystemExit(f"source folder {path}: no {part} "
                             "(export microsoft/MInference at commit 37e9073 or later)")
    return path


def provenance(folder: Path) -> dict:
    """Where the source comes from: origin, commit (from the export's COMMIT file) and folder."""
    commit_file = folder / "COMMIT"
    commit = commit_file.read_text().strip() if commit_file.is_file() else None
    return {"origin": ORIGIN, "commit": commit, "folder": str(folder.resolve())}


def build_extension(folder: Path, build_dir: str | None = None) -> types.ModuleType:
    """Their CUDA index converter (csrc/kernels.cpp + csrc/vertical_slash_index.cu) built by torch's
    JIT extension loader for the visible GPU, in place of ``setup.py build_ext`` (a second call with
    the same ``build_dir`` reuses the build). Raises whatever the compiler or loader raised."""
    from torch.utils.cpp_extension import load

    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
    return load(name="minference_cuda", sources=[str(folder / "csrc/kernels.cpp"),
                                                  str(folder / "csrc/vertical_slash_index.cu")],
                extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=["-O3", "-std=c++17"],
                build_directory=build_dir, verbose=False)


def _stub(name: str, reason: str, **attrs) -> None:
    """Register an empty module ``name`` (attributes ``attrs``; a module among them is registered as
    its submodule) when the real one cannot be imported."""
    if importlib.util.find_spec(name) is not None:
        return
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    for attr, value in attrs.items():
        if isinstance(value, types.ModuleType):
            sys.modules[f"{name}.{attr}"] = value
    PATCHES.append(f"{name}: not installed; an empty stub module stands in ({reason})")


def _unavailable(what: str, why: str) -> Callable:
    def call(*args, **kwargs):
        raise RuntimeError(f"{what} is unavailable: {why}")
    return call


@contextlib.contextmanager
def _bool_package_check():
    """transformers 5.x's ``_is_package_available`` returns ``(exists, version)``: their
    ``if _is_package_available("vllm")`` is then always true and imports the absent vllm. While their
    modules import, a call from a ``minference.*`` module gets the bool it expects (transformers' own
    calls, made during the same imports, get the tuple); the original is restored afterwards."""
    import transformers.utils.import_utils as import_utils

    original = import_utils._is_package_available
    result = original("vllm")
    if not isinstance(result, tuple):
        yield
        return

    def as_bool(pkg_name: str, return_version: bool = False):
        found = original(pkg_name, return_version)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        return bool(found[0]) if caller.startswith("minference.") and not return_version else found

    import_utils._is_package_available = as_bool
    PATCHES.append("transformers.utils.import_utils._is_package_available: returns a bool while minference "
                   "imports (5.x returns a tuple, so their `if _is_package_available('vllm')` imported the "
                   "absent vllm)")
    try:
        yield
    finally:
        import_utils._is_package_available = original


def load(folder: Path, extension: types.ModuleType | None, extension_error: str | None = None) -> types.ModuleType:
    """Import their ``minference`` package from ``folder`` with the import-time patches; returns it.

    ``extension`` is the built ``minference.cuda`` (``build_extension``); None registers a stand-in
    whose function raises ``extension_error``, so tri_mix and dense still run and only the
    vertical-slash path (tri_mix_minference) fails, with that reason. Raises RuntimeError (one line)
    when the import fails, e.g. on a machine without CUDA: their modules create CUDA tensors on import."""
    if "minference" in sys.modules:
        return sys.modules["minference"]
    _stub("tilelang", "imported at top level by modules/leank.py and ops/leank_flash_decoding.py; LeanK is "
                      "not on the tri_mix path", language=types.ModuleType("tilelang.language"))
    _stub("einops", "imported at top level by modules/flexprefill.py; FlexPrefill is not run here",
          rearrange=_unavailable("einops.rearrange", "einops is not installed"))
    if extension is None:
        why = extension_error or "not built"
        extension = types.ModuleType("minference.cuda")
        extension.convert_vertical_slash_indexes = _unavailable(
            "minference.cuda.convert_vertical_slash_indexes", f"their CUDA extension is not built: {why}")
        PATCHES.append(f"minference.cuda: not built ({why[:200]}); a stand-in raises on use, so "
                       "tri_mix_minference fails and tri_mix/dense run")
    else:
        PATCHES.append("minference.cuda: csrc/kernels.cpp + csrc/vertical_slash_index.cu built by "
                       "torch.utils.cpp_extension.load (-O3) for the visible GPU instead of setup.py build_ext")
    sys.modules["minference.cuda"] = extension
    try:
        with _bool_package_check():
            package = _import_package(folder)
    except Exception as ex:  # report one line, not their traceback
        for name in [n for n in sys.modules if n == "minference" or n.startswith("minference.")]:
            if name != "minference.cuda":
                del sys.modules[name]
        message = f"importing minference from {folder} failed: {type(ex).__name__}: {ex}"
        raise RuntimeError(message.splitlines()[0]) from ex
    _patch_decoder_layer(package)
    return package


def _import_package(folder: Path) -> types.ModuleType:
    """Import ``minference``, first giving ``minference.patch`` the ``patch_leank`` that its
    ``models_patch`` imports from there: up to at least fb56c91 it lives in ``modules/leank.py`` only
    (their issue #187, fixed by their PR #189), so ``import minference`` fails as released."""
    spec = importlib.util.spec_from_file_location("minference", folder / "minference/__init__.py",
                                                  submodule_search_locations=[str(folder / "minference")])
    package = importlib.util.module_from_spec(spec)
    sys.modules["minference"] = package
    patch = importlib.import_module("minference.patch")
    if not hasattr(patch, "patch_leank"):
        patch.patch_leank = importlib.import_module("minference.modules.leank").patch_leank
        PATCHES.append("minference.patch.patch_leank: set to modules/leank.py's patch_leank before the package "
                       "__init__ runs (models_patch.py imports it from minference.patch, where it is not: their "
                       "issue #187, fixed by their PR #189 after this commit)")
    spec.loader.exec_module(package)
    return package


def _patch_decoder_layer(package: types.ModuleType) -> None:
    """Their decoder-layer forward returns ``(hidden_states,)``; transformers 5.x's model loop feeds a
    layer's return value straight to the next layer, so it must be the tensor."""
    patch = importlib.import_module("minference.patch")
    original = patch.forward_llama_decoder_layer

    def forward_returning_tensor(self, hidden_states, *args, **kwargs):
        return original(self, hidden_states, *args, **kwargs)[0]

    patch.forward_llama_decoder_layer = forward_returning_tensor
    PATCHES.append("minference.patch.forward_llama_decoder_layer: returns the hidden-states tensor instead of a "
                   "1-tuple (transformers 5.x passes a layer's output straight to the next layer)")


def sdpa_backends() -> dict:
    """Name -> torch SDPA backend, for the dense kernel that stands in for flash_attn."""
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def sdpa_causal(backend_name: str) -> Callable:
    """``f(q, k, v, causal)`` on ``[B, H, T, D]`` tensors: torch SDPA held to one backend."""
    import torch
    from torch.nn.attention import sdpa_kernel

    backend = sdpa_backends()[backend_name]

    def attend(q, k, v, causal: bool):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attend


def install_dense_kernel(package: types.ModuleType, backend_name: str) -> None:
    """Make their dense layers run torch SDPA with ``backend_name`` (flash_attn is not installed; their
    fallback is an old Triton kernel): their ``flash_attn_func`` in the tri_mix and MInference modules,
    and transformers' ``_flash_attention_forward`` that their ``dense`` attention type calls."""
    attend = sdpa_causal(backend_name)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **unused):
        if dropout_p or softmax_scale is not None:
            raise ValueError("the SDPA stand-in for flash_attn_func takes dropout_p=0 and softmax_scale=None only")
        return attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal).transpose(1, 2)

    def flash_attention_forward(query_states, key_states, value_states, attention_mask, query_length,
                                is_causal=True, dropout=0.0, **unused):
        if attention_mask is not None or dropout:
            raise ValueError("the SDPA stand-in for _flash_attention_forward takes no attention mask and no dropout")
        return flash_attn_func(query_states, key_states, value_states, causal=is_causal)

    for module_name in ("minference.modules.tri_mix", "minference.modules.minference_forward"):
        importlib.import_module(module_name).flash_attn_func = flash_attn_func
    importlib.import_module("minference.modules.forward")._flash_attention_forward = flash_attention_forward
    PATCHES.append(f"flash_attn_func (modules/tri_mix.py, modules/minference_forward.py) and "
                   f"_flash_attention_forward (modules/forward.py, attn_type 'dense'): torch SDPA, {backend_name} "
                   "backend, causal, [B, T, H, D] in and out (flash_attn is not installed)")


def main(argv: list[str] | None = None) -> None:
    """``python3 minference_source.py SOURCE BUILD_DIR``: build their CUDA extension ahead of the timed
    steps (the TTFT peer's own build call then finds it done); exit status 1 with the reason if it fails."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("build_dir")
    args = parser.parse_args(argv)
    folder = check_folder(args.source)
    t0 = time.perf_counter()
    try:
        build_extension(folder, args.build_dir)
    except Exception as ex:  # the reason on one line; the TTFT peer reports it again
        raise SystemExit(f"minference extension build failed after {time.perf_counter() - t0:.0f} s: "
                         f"{type(ex).__name__}: {str(ex)[-600:]}")
    print(f"minference extension built in {time.perf_counter() - t0:.0f} s ({args.build_dir})")


if __name__ == "__main__":
    main()
