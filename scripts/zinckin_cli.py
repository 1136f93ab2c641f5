"""Run the zinckin command line from a checkout without installing the console script.

Usage: python scripts/zinckin_cli.py fit data/example/fit.toml
"""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference._cli import entry  # noqa: E402


if __name__ == "__main__":
    entry()
