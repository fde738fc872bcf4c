"""Hugging Face Space / local entry point: `python app.py` (same as `python -m chatfb serve`)."""

import sys

from chatfb.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
