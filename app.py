"""Hugging Face Space / local entry point: `python app.py` (same as `python -m chatfb serve`)."""

import os
import sys

if __name__ == "__main__":
    if os.environ.get("SPACE_ID"):  # a Space installs requirements.txt only: fix the torchvision trap here
        from chatfb.serving.environment import repair_torchvision_trap

        repair_torchvision_trap()
    from chatfb.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
