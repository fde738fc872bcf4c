"""Train one LoRA adapter with PEFT + TRL: SFT on the examples, then DPO on preference pairs.

Run as its own process (the nightly job does): heavy imports stay out of the app, a crash or a
kill cannot hurt the server, and on GPUs the same entry point runs under `accelerate launch`:

    python -m chatfb.train --data DIR --base MODEL_DIR --out ADAPTER_DIR
    accelerate launch -m chatfb.train --data DIR --base MODEL_DIR --out ADAPTER_DIR

DIR holds sft.jsonl ({"prompt": [...], "completion": [...]}) and optionally dpo.jsonl.
The adapter is written to ADAPTER_DIR.partial and renamed when complete, so a failed or killed
run leaves nothing that looks like an adapter. Progress lines: "step i/N loss x eta Ns".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m chatfb.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder with sft.jsonl and optional dpo.jsonl")
    p.add_argument("--base", required=True, help="base model folder (or Hub id)")
    p.add_argument("--out", type=Path, required=True, help="adapter output folder")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--epochs", type=float, default=4.0, help="SFT epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--batch-size", type=int, default=4, help="per-device batch size")
    p.add_argument("--max-length", type=int, default=512, help="longest tokenised example")
    p.add_argument("--dpo-epochs", type=float, default=1.0, help="DPO epochs after SFT (0 = skip DPO)")
    p.add_argument("--max-steps", type=int, default=0, help="cap on optimizer steps per phase (0 = epochs decide)")
    p.add_argument("--dpo-beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--seed", type=int, default=1234, help="random seed")
    return p


def progress_callback(phase: str):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs or not state.max_steps:
                return
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(state.global_step, 1) * (state.max_steps - state.global_step)
            print(f"[{phase}] step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} eta {eta:.0f}s",
                  flush=True)

    return Progress()


def step_cap(examples: int, epochs: float, batch_size: int, max_steps: int) -> int:
    """Trainer max_steps: -1 (epochs decide) unless the epochs would take more than max_steps steps.
    (A positive max_steps replaces the epochs in transformers, so it is only passed when it caps.)"""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = math.ceil(math.ceil(examples / (batch_size * world)) * epochs)
    return max_steps if 0 < max_steps < steps else -1


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(args: argparse.Namespace) -> int:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, set_seed
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    set_seed(args.seed)
    gpu = torch.cuda.is_available()
    sft_rows, dpo_rows = read_jsonl(args.data / "sft.jsonl"), read_jsonl(args.data / "dpo.jsonl")
    if not sft_rows:
        print("no SFT examples; nothing to train", file=sys.stderr)
        return 3
    partial = args.out.with_name(args.out.name + ".partial")
    # Under torchrun / accelerate launch every process trains its share; only the first writes files.
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        shutil.rmtree(partial, ignore_errors=True)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules=TARGET_MODULES,
                      task_type="CAUSAL_LM")
    common = dict(output_dir=str(partial / "_work"), seed=args.seed, logging_steps=1, report_to=[], save_strategy="no",
                  per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="constant_with_warmup",
                  warmup_steps=2, use_cpu=not gpu, disable_tqdm=True,
                  # TRL defaults to bf16 + gradient checkpointing: emulated bf16 makes CPU training ~20x slower.
                  bf16=gpu and torch.cuda.is_bf16_supported(), gradient_checkpointing=gpu)
    sft_steps = step_cap(len(sft_rows), args.epochs, args.batch_size, args.max_steps)
    sft = SFTTrainer(model=model, processing_class=tokenizer, peft_config=lora,
                     train_dataset=Dataset.from_list(sft_rows),
                     args=SFTConfig(num_train_epochs=args.epochs, max_steps=sft_steps, max_length=args.max_length, **common),
                     callbacks=[progress_callback("sft")])
    sft.remove_callback(PrinterCallback)  # our progress lines replace its raw dicts
    sft_result = sft.train()
    model = sft.model
    stats = {"sft_examples": len(sft_rows), "sft_steps": sft_result.global_step, "sft_loss": round(sft_result.training_loss, 4)}
    if dpo_rows and args.dpo_epochs > 0:
        dpo = DPOTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(dpo_rows),
                         args=DPOConfig(num_train_epochs=args.dpo_epochs, beta=args.dpo_beta,
                                        max_steps=step_cap(len(dpo_rows), args.dpo_epochs, args.batch_size, args.max_steps), max_length=args.max_length,
                                        **dict(common, learning_rate=args.lr / 5)),
                         callbacks=[progress_callback("dpo")])
        dpo.remove_callback(PrinterCallback)
        dpo_result = dpo.train()
        model = dpo.model
        stats.update(dpo_pairs=len(dpo_rows), dpo_steps=dpo_result.global_step, dpo_loss=round(dpo_result.training_loss, 4))
    if not main_process:
        return 0
    stats["processes"] = int(os.environ.get("WORLD_SIZE", "1"))
    model.save_pretrained(partial)
    shutil.rmtree(partial / "_work", ignore_errors=True)
    stats["train_seconds"] = round(time.perf_counter() - t0, 1)
    (partial / "chatfb_train.json").write_text(json.dumps(stats, indent=2))
    shutil.rmtree(args.out, ignore_errors=True)
    partial.rename(args.out)
    print(f"[done] adapter saved to {args.out}: {json.dumps(stats)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
