#!/usr/bin/env python
"""Write scikit-learn's bundled handwritten digits as PNG files, one folder per digit.

python scripts/make_digits.py OUT [--digits 0,1,2] [--size 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bottleneck.demo import write_digits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (one sub-folder per digit)")
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated digits to write")
    parser.add_argument("--size", type=int, default=64, help="side of the upscaled PNGs in pixels")
    args = parser.parse_args()
    digits = [int(d) for d in args.digits.split(",")]
    print(f"{write_digits(args.out, digits, args.size)} digit images in {args.out} ({len(digits)} classes)")


if __name__ == "__main__":
    main()
