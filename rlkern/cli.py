"""The ``rlkern`` command: ``rlkern info`` and ``rlkern bench``."""

from __future__ import annotations

import argparse
import os
import platform
import sys


def _info() -> int:
    """What this process runs: versions, rlkern._C and triton (loaded, or why not), each backend
    (available, or why not) and the backend each op picks for CPU and for CUDA tensors, so that
    a fallback to the PyTorch reference is never a silent slow path."""
    import torch

    import rlkern
    from rlkern import _backend

    cuda = torch.cuda.is_available()
    print(f"rlkern      {rlkern.__version__}  ({os.path.dirname(rlkern.__file__)})")
    print(f"python      {platform.python_version()}")
    print(f"torch       {torch.__version__}  (CUDA {torch.version.cuda or 'none'})")
    print(f"device      {torch.cuda.get_device_name() if cuda else 'CPU (torch sees no CUDA device)'}, "
          f"{torch.get_num_threads()} CPU threads")
    if _backend.has_cpp():
        print(f"rlkern._C   loaded{', with CUDA kernels' if _backend.has_cuda_ext() else ', CPU kernels only'}")
    else:
        label = {"missing": "missing", "mismatched": "built against another torch"}.get(_backend.C_STATUS, "broken")
        print(f"rlkern._C   {label}: {_backend.C_REASON}")
    version, problem = _backend.triton_status()
    minimum = ".".join(map(str, _backend.MIN_TRITON))
    if problem is None:
        print(f"triton      {version} ok (minimum {minimum})"
              f"{'  (interpreter: TRITON_INTERPRET=1)' if _backend.triton_interpreted() else ''}")
    elif version is None and problem == "not installed":
        print(f"triton      missing: not installed (minimum {minimum})")
    else:
        print(f"triton      {'too old' if version else 'broken'}: {problem}, not used")
    print("backends this process can run:")
    for name in _backend.BACKENDS:
        reason = _backend.unavailable(name)
        print(f"  {name + ':':<9} {'available' if reason is None else 'unavailable (' + reason + ')'}"
              f"{' (the PyTorch reference: the fallback)' if name == 'torch' else ''}")
    try:
        forced = _backend.forced()
    except ValueError as error:
        print(f"forced      invalid: {error}")
        return 2
    print(f"forced      RLKERN_BACKEND={forced}" if forced else "forced      none (RLKERN_BACKEND unset)")
    dtype = torch.bfloat16 if cuda else torch.float32
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    print(f"backend per op, {str(dtype).removeprefix('torch.')} / float64 inputs"
          + ("" if cuda else " (CUDA tensors: what they would run; this process has no CUDA device)") + ":")
    print(f"  {'op':<24} {'CPU tensors':<16} CUDA tensors")
    _backend._QUIET = True  # the table asks about CUDA tensors this process may never see: no warnings
    try:
        for name, kernels in sorted(_backend.REGISTRY.items()):
            on_cpu = f"{kernels.backend_at(cpu, dtype)} / {kernels.backend_at(cpu, torch.float64)}"
            on_gpu = f"{kernels.backend_at(gpu, dtype)} / {kernels.backend_at(gpu, torch.float64)}"
            print(f"  {name:<24} {on_cpu:<16} {on_gpu}")
        device = gpu if cuda else cpu
        token_backend = _backend.REGISTRY["token_logprobs"].backend_at(device, dtype)
        loss_backend = _backend.REGISTRY["policy_loss"].backend_at(device, dtype)
        pref_backend = _backend.REGISTRY["token_preference_loss"].backend_at(device, dtype)
    finally:
        _backend._QUIET = False
    gemm = "cuBLAS" if cuda else "ATen CPU"
    print(f"linear_token_logprobs on {device.type} runs: chunked ({gemm} GEMM tiles + {token_backend} log-prob kernel)")
    print(f"linear_policy_loss on {device.type} runs: {gemm} GEMM tiles + {token_backend} log-prob kernel + "
          f"{loss_backend} policy-loss kernel, gradients formed in the forward")
    print(f"linear_preference_loss on {device.type} runs: {gemm} GEMM tiles + {token_backend} log-prob kernel + "
          f"{pref_backend} preference kernels, gradients formed in the forward")
    return 0


def _bench(families: list[str], full: bool, out: str | None, argv: list[str]) -> int:
    # libgomp's spin-wait makes CPU timings swing by 10-80x on shared machines; it is read when
    # the OpenMP runtime starts, so set it and start again before torch is imported. The child
    # imports this same rlkern: its folder goes first on sys.path, and the current directory
    # is not added (`python -m` would put it first).
    if os.environ.get("OMP_WAIT_POLICY") is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        import rlkern

        here = os.path.dirname(os.path.dirname(os.path.abspath(rlkern.__file__)))
        code = f"import sys; sys.path[0] = {here!r}; from rlkern.cli import main; sys.exit(main())"
        os.execv(sys.executable, [sys.executable, "-c", code, *argv])
    import importlib
    import time

    import torch

    from rlkern.benches import common, plot, suite

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"rlkern bench: {'full' if full else 'quick'} suite on {common.device_name(device)}"
          + (f"; results to {out}" if out else ""), flush=True)
    start = time.perf_counter()
    for family in families or suite.FAMILIES:
        common.set_family(family)
        module = importlib.import_module(f"rlkern.benches.bench_{family}")
        results = []
        for name, args in suite.runs(family, full=full, cuda=cuda):
            print(f"\n## {name}\n", flush=True)
            rows = module.main(args + (["--out", os.path.join(out, name)] if out else []))
            results.append((name, rows))
        if out:
            path = plot.plot_family(family, results, os.path.join(out, f"{family}.png"), common.device_name(device))
            print(f"\n{path or 'no plot (matplotlib is not installed: pip install matplotlib)'}", flush=True)
    print(f"\nrlkern bench: done in {time.perf_counter() - start:.0f} s", flush=True)
    for module, reason in common.BROKEN_PEERS.items():
        print(f"rlkern bench: peer {module} is installed but failed to import: {reason}", file=sys.stderr)
    return 1 if common.BROKEN_PEERS and os.environ.get("RLKERN_REQUIRE_PEERS") == "1" else 0


def main(argv: list[str] | None = None) -> int:
    from rlkern.benches.suite import FAMILIES

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="rlkern", description="rlkern: fused kernels for LLM RL")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, backends")
    bench = sub.add_parser("bench", help="benchmarks vs the peers on this machine's device (GPU if any)")
    bench.add_argument("families", nargs="*", metavar="FAMILY",
                       help=f"any of {', '.join(FAMILIES)} (default: all); "
                            "`python -m rlkern.benches.bench_FAMILY --help` for one bench's shapes")
    bench.add_argument("--full", action="store_true",
                       help="the long suite: the shapes and variants behind the committed results")
    bench.add_argument("--out", metavar="DIR", help="write NAME.json, NAME.md per run and FAMILY.png per family")
    args = parser.parse_args(argv)
    unknown = [f for f in getattr(args, "families", []) if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown benchmark family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    if args.command == "info":
        return _info()
    return _bench(args.families, args.full, args.out, argv)


if __name__ == "__main__":
    sys.exit(main())
