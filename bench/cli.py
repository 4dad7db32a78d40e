"""``bench embed|train|kernels|io|onnx|all [--size tiny|small|full] [--out bench/results]``.

Each command runs its bench, prints a table, and merges its section into today's report for this device
(``<out>/<device>_<yyyymmdd>.json`` and ``.md``; see :mod:`bench.report`). ``all`` runs the four in turn and
writes the report after each, so a bench that fails leaves the others' figures in place; the exit status is
then 1 and the error is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from bench.context import SIZES, Context
from bench.report import Env, print_section, write_report

# run order of `all`: cheapest first, so a time limit (run_gpu.sh gives the benches one) cuts the longest
# (embed, which encodes with every model up to vit_h at full size); the report keeps its own order
BENCHES = ("kernels", "io", "train", "embed")
# needs the onnx extra, and its export alone takes about a minute on 2 cores: run it by name, not in `all`
ON_REQUEST = ("onnx",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[1])
    ap.add_argument(
        "command", choices=(*BENCHES, *ON_REQUEST, "all"), help="which bench to run; all = every one in turn"
    )
    ap.add_argument(
        "--size",
        choices=SIZES,
        default="tiny",
        help="tiny: seconds on CPU (the smoke test); small: minutes on CPU; full: the issue's sizes (GPU)",
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results"), help="report folder")
    ap.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu or cuda[:N]")
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="scratch folder for datasets and caches, kept so later runs reuse them (default: a temporary "
        "folder, removed after); the io bench measures the disk it lies on",
    )
    return ap.parse_args(argv)


@contextlib.contextmanager
def _scratch(work: Path | None):
    """``work`` itself when given (kept, so caches are reused by later runs), else a temporary folder."""
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    with tempfile.TemporaryDirectory(prefix="samtune-bench-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    names = BENCHES if args.command == "all" else (args.command,)
    env = Env.detect(device)
    failed, written = [], None
    with _scratch(args.work) as work:
        ctx = Context(size=args.size, device=device, work=work, out=args.out, env=env)
        for name in names:
            module = importlib.import_module(f"bench.{name}")
            load0 = os.getloadavg()[0]
            try:
                sec = module.run(ctx)
                load1 = os.getloadavg()[0]
                sec.notes.append(
                    f"Host load (1-min average) {load0:.1f} at the start and {load1:.1f} at the end, on "
                    f"{os.cpu_count()} CPUs: other work competing for the CPU widens the spread of every "
                    "figure and biases ratios between figures measured at different moments."
                )
                print_section(sec)
                written = write_report(args.out, env, [sec])
            except Exception:  # keep the other benches' figures; report the failure and exit non-zero
                traceback.print_exc()
                failed.append(name)
    if written is not None:
        print(f"\nreport: {written[1]} (and {written[0].name})")
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
