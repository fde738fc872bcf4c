"""The trainer under torchrun with two CPU processes (gloo): the multi-GPU path (`accelerate launch` /
`torchrun -m chatfb.learning.train`) runs the same code, so it is not untested. ~1-2 min on 2 cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_two_gloo_processes_train_one_loadable_adapter(tmp_path, embedded_model):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data = tmp_path / "work"
    data.mkdir()
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "completion": [{"role": "assistant", "content": f"{2 * i}, my friend."}]} for i in range(8)]
    (data / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "adapters" / "chatfb-v0001"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "chatfb.learning.train", "--data", str(data), "--base", str(embedded_model), "--output_dir", str(out),
           "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--dpo_epochs", "0", "--rank", "4"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    stats = json.loads((out / "chatfb_train.json").read_text())
    # 8 examples, batch 2 per process: 2 steps with two processes sharing the data (4 with one)
    assert (stats["processes"], stats["sft_steps"]) == (2, 2), f"two processes must share the data: {stats}"
    assert not out.with_name(out.name + ".partial").exists(), "the .partial folder was left behind"

    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "every LoRA B is still zero: nothing trained"
    base = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all(), "the trained adapter gives NaN or inf logits"
