"""The ``rlkern`` command: ``rlkern info`` and ``rlkern bench``."""

from __future__ import annotations

import argparse
import os
import platform
import sys


def _info() -> int:
    import torch

    import rlkern
    from rlkern import _backend

    cuda = torch.cuda.is_available()
    print(f"rlkern      {rlkern.__version__}  ({os.path.dirname(rlkern.__file__)})")
    print(f"python      {platform.python_version()}")
    print(f"torch       {torch.__version__}  (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton      {triton.__version__}{'  (interpreter: TRITON_INTERPRET=1)' if _backend.triton_interpreted() else ''}")
    except ImportError:
        print("triton      not installed")
    print(f"device      {torch.cuda.get_device_name() if cuda else 'CPU'}, {torch.get_num_threads()} CPU threads")
    print(f"rlkern._C   {'built' if _backend.has_cpp() else 'missing (' + str(_backend._C_ERROR) + ')'}"
          f"{', with CUDA kernels' if _backend.has_cuda_ext() else ', CPU kernels only' if _backend.has_cpp() else ''}")
    print(f"backends    {', '.join(k for k, v in _backend.available().items() if v)}")
    forced = _backend.forced()
    print(f"forced      RLKERN_BACKEND={forced}" if forced else "forced      none (RLKERN_BACKEND unset)")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    print(f"backend per op on {device.type} ({str(dtype).removeprefix('torch.')} / float64 inputs):")
    for name, kernels in sorted(_backend.REGISTRY.items()):
        print(f"  {name:<24} {kernels.backend_at(device, dtype):<7} / {kernels.backend_at(device, torch.float64)}")
    gemm = "cuBLAS" if cuda else "ATen CPU"
    token_backend = _backend.REGISTRY["token_logprobs"].backend_at(device, dtype)
    print(f"linear_token_logprobs on {device.type} runs: chunked ({gemm} GEMM tiles + {token_backend} log-prob kernel)")
    loss_backend = _backend.REGISTRY["policy_loss"].backend_at(device, dtype)
    pref_backend = _backend.REGISTRY["token_preference_loss"].backend_at(device, dtype)
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
