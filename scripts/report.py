#!/usr/bin/env python
"""Write the HTML report of a runs folder and print its tables as Markdown.

    python scripts/report.py --runs runs [--out report.html]

The same as `bottleneck report`; this script needs no install beyond the package's dependencies.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bottleneck.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
