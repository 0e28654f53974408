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
    token_backend = _backend.choose(device, ("cpp", "triton"), dtype)
    print(f"token_logprobs on {device.type} runs: {token_backend}")
    gemm = "cuBLAS" if cuda else "ATen CPU"
    print(f"linear_token_logprobs on {device.type} runs: chunked ({gemm} GEMM tiles + {token_backend} log-prob kernel)")
    return 0


BENCH_FAMILIES = ("logprobs", "linear_logprobs", "policy_loss", "advantages", "trees")


def _bench(families: list[str]) -> int:
    # libgomp's spin-wait makes CPU timings swing by 10-80x on shared machines; it is read when
    # the OpenMP runtime starts, so set it and start again before torch is imported.
    if os.environ.get("OMP_WAIT_POLICY") is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "rlkern.cli", "bench", *families])
    import importlib

    for family in families or BENCH_FAMILIES:
        print(f"\n## {family}\n", flush=True)
        importlib.import_module(f"rlkern.benches.bench_{family}").main([])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="rlkern", description="rlkern: fused kernels for LLM RL")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, backends")
    bench = sub.add_parser("bench", help="benchmarks vs the peers on this machine's device (GPU if any)")
    bench.add_argument("families", nargs="*", metavar="FAMILY",
                       help=f"any of {', '.join(BENCH_FAMILIES)} (default: all); "
                            "`python -m rlkern.benches.bench_FAMILY --help` for shapes and --out")
    args = parser.parse_args(argv)
    unknown = [f for f in getattr(args, "families", []) if f not in BENCH_FAMILIES]
    if unknown:
        parser.error(f"unknown benchmark family {unknown[0]!r}; choose from {', '.join(BENCH_FAMILIES)}")
    if args.command == "info":
        return _info()
    return _bench(args.families)

if __name__ == "__main__":
    sys.exit(main())
