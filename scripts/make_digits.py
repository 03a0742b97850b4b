#!/usr/bin/env python
"""Write scikit-learn's bundled handwritten digits as PNG files, one folder per digit.

The 8x8 images are upscaled so they go through the real decoding path as ordinary image files.
Nothing is downloaded: the digits ship with scikit-learn. Existing files are left as they are,
so a second run changes nothing (and `bottleneck features` then computes nothing).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: Path, digits: list[int], size: int = 64) -> int:
    """Write every bundled image of the given digits into out/<digit>/; return how many exist."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    count = 0
    for index, (image, target) in enumerate(zip(bunch.images, bunch.target)):
        if int(target) not in digits:
            continue
        folder = out / str(int(target))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"digit_{index:04d}.png"
        if not path.exists():
            pixels = (255 - image * (255 / 16)).astype(np.uint8)  # dark ink on white paper
            Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC).save(path)
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (one sub-folder per digit)")
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated digits to write")
    parser.add_argument("--size", type=int, default=64, help="side of the upscaled PNGs in pixels")
    args = parser.parse_args()
    digits = [int(d) for d in args.digits.split(",")]
    count = write_digits(args.out, digits, args.size)
    print(f"{count} digit images in {args.out} ({len(digits)} classes)")


if __name__ == "__main__":
    main()
