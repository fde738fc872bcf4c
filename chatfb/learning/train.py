"""Train one LoRA adapter with PEFT + TRL: SFT on the examples, then DPO on preference pairs.

Run as its own process (the nightly job does): heavy imports stay out of the app, a crash or a
kill cannot hurt the server, and on GPUs the same entry point runs under `accelerate launch`:

    python -m chatfb.learning.train --data DIR --base MODEL_DIR --output_dir ADAPTER_DIR
    accelerate launch -m chatfb.learning.train --data DIR --base MODEL_DIR --output_dir ADAPTER_DIR

The flags are TRL's own (`trl.TrlParser`): `Recipe` below, and every field of `trl.SFTConfig`
(`--num_train_epochs`, `--learning_rate`, `--seed`, `--max_steps`, ...; `--help` lists them, and
`--config FILE.yaml` reads them from a file). Their defaults are chatfb's settings (chatfb.config),
the ones the nightly cycle trains with.

DIR holds sft.jsonl (prompt/completion rows, chatfb.learning.rows) and optionally dpo.jsonl. The adapter is
written to ADAPTER_DIR.partial and renamed when complete, so a failed or killed run leaves nothing
that looks like an adapter. Progress goes to stdout as one JSON object per optimizer step,
{"phase", "step", "total", "loss", "eta_s"}, and a last {"phase": "done", ...} with the run's stats.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatfb.config import Settings
from chatfb.learning.rows import read_rows, trl_fields

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULTS = Settings()  # the field defaults only: the nightly passes the running settings as flags


@dataclass
class Recipe:
    """What chatfb's recipe adds to TRL's SFTConfig: the data, the base model, the adapter, the DPO phase."""

    data: str = field(metadata={"help": "Folder with sft.jsonl (prompt/completion rows) and optional dpo.jsonl."})
    base: str = field(metadata={"help": "Base model folder (or Hub id)."})
    rank: int = field(default=DEFAULTS.lora_rank, metadata={"help": "LoRA rank (alpha is twice the rank)."})
    step_cap: int = field(default=DEFAULTS.train_max_steps, metadata={
        "help": "Most optimizer steps per phase: the epochs decide unless they would take more (0 = no cap). "
                "A positive --max_steps replaces both."})
    dpo_epochs: float = field(default=1.0, metadata={"help": "DPO epochs after SFT when dpo.jsonl has pairs (0 = no DPO)."})
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO beta."})
    init_adapter: str | None = field(default=None, metadata={
        "help": "An adapter folder to train on from (its weights, rank and modules; --rank is ignored): a personal "
                "adapter starts from the shared one, and is still one whole LoRA on the base model."})
    more: str | None = field(default=None, metadata={
        "help": "A JSON file listing further adapters this process trains after the first, one after another with "
                "the same flags, each {\"data\", \"output_dir\", \"init_adapter\", \"dpo_epochs\"}: a cycle's "
                "personal adapters pay the imports and the start once. Each loads the base model afresh."})


def trainer_defaults() -> dict:
    """chatfb's values for SFTConfig fields, where they differ from TRL's: the settings' epochs, learning
    rate and seed, a small batch, one log line per step, no checkpoints, and float32 on a CPU (TRL's
    bf16 + gradient checkpointing make CPU training ~20x slower)."""
    import torch

    gpu = torch.cuda.is_available()
    return dict(num_train_epochs=DEFAULTS.train_epochs, learning_rate=DEFAULTS.learning_rate, seed=DEFAULTS.seed,
                per_device_train_batch_size=4, max_length=512, logging_steps=1, report_to="none", save_strategy="no",
                lr_scheduler_type="constant_with_warmup", warmup_steps=2, disable_tqdm=True, use_cpu=not gpu,
                bf16=gpu and torch.cuda.is_bf16_supported(), gradient_checkpointing=gpu)


def make_parser():
    from trl import SFTConfig, TrlParser

    parser = TrlParser((Recipe, SFTConfig), prog="python -m chatfb.learning.train", description=__doc__.split("\n")[0])
    parser.set_defaults_with_config(**trainer_defaults())
    return parser


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
            print(json.dumps({"phase": phase, "step": state.global_step, "total": state.max_steps,
                              "loss": round(float(logs["loss"]), 4), "eta_s": round(eta)}), flush=True)

    return Progress()


def end_to_end_collator(tokenizer, args, model=None):
    """The SFT batches' rows laid end to end in one sequence, each with its own positions, instead of padded to the
    longest: a replay answer of 180 tokens beside feedback rows of 50 otherwise pads every row of its batch to 180,
    and on a CPU the padding costs as much as the tokens (a personal adapter's 9 steps: 20 s instead of 30 s).
    It is the same training only where the model keeps each row to itself: transformers does for attention models
    given position ids, no attention mask and no cache (TRL's SFT loss asks none), but not every architecture a
    --base may name (models that build their mask without position ids; recurrent or convolutional layers carry a
    row's state into the next). So `model` is asked first (`keeps_rows_apart`), and a model that mixes them trains
    on padded batches as before. The first token of each row predicts nothing from the row before it. TRL's own
    --padding_free refuses --max_length (it would not truncate); the rows here are truncated to it when TRL
    prepares them, before this collator. None (TRL's padded collator) when the flags ask for packing or
    padding-free themselves, or the model mixes rows."""
    if args.packing or args.padding_free:
        return None
    if model is not None and not keeps_rows_apart(model):
        print("this model mixes rows laid end to end: training on padded batches", file=sys.stderr, flush=True)
        return None
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    pad = tokenizer.convert_tokens_to_ids(args.pad_token) if args.pad_token else tokenizer.pad_token_id
    return DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True, pad_to_multiple_of=args.pad_to_multiple_of)


def keeps_rows_apart(model) -> bool:
    """Whether `model` computes a row laid after another exactly as it computes it alone (two short rows of
    arbitrary tokens, no gradient, dropout off): False when anything of the first row reaches the second."""
    import torch

    was_training = model.training
    model.eval()
    try:
        embeddings = model.get_input_embeddings()
        g = torch.Generator().manual_seed(0)
        first, second = (torch.randint(0, embeddings.num_embeddings, (n,), generator=g) for n in (7, 11))
        device = embeddings.weight.device
        with torch.no_grad():
            alone = model(input_ids=second[None].to(device), use_cache=False).logits[0].float()
            after = model(input_ids=torch.cat([first, second])[None].to(device), use_cache=False,
                          position_ids=torch.cat([torch.arange(7), torch.arange(11)])[None].to(device)).logits[0, 7:].float()
        # a bf16 model on a GPU differs in the last digits between sequence lengths; a mixed row differs wholly
        return bool((alone - after).abs().max() <= 0.02 * alone.abs().max() + 1e-4)
    except Exception as e:  # noqa: BLE001 - a model that cannot be asked this way trains padded, as before
        print(f"could not check rows laid end to end ({type(e).__name__}: {e}): training on padded batches",
              file=sys.stderr, flush=True)
        return False
    finally:
        model.train(was_training)


def step_cap(examples: int, epochs: float, batch_size: int, max_steps: int) -> int:
    """Trainer max_steps: -1 (epochs decide) unless the epochs would take more than max_steps steps.
    (A positive max_steps replaces the epochs in transformers, so it is only passed when it caps.)"""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = math.ceil(math.ceil(examples / (batch_size * world)) * epochs)
    return max_steps if 0 < max_steps < steps else -1


def main(recipe: Recipe, args) -> int:
    """Train with `args` (a parsed trl.SFTConfig; its output_dir is the adapter folder)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, set_seed
    from trl import DPOConfig, DPOTrainer, SFTTrainer

    set_seed(args.seed)
    data, out = Path(recipe.data), Path(args.output_dir)
    sft_rows = [trl_fields(r) for r in read_rows(data / "sft.jsonl")]  # provenance stays in the files
    dpo_rows = [trl_fields(r) for r in read_rows(data / "dpo.jsonl")]
    if not sft_rows:
        print("no SFT examples; nothing to train", file=sys.stderr)
        return 3
    partial = out.with_name(out.name + ".partial")
    # Under torchrun / accelerate launch every process trains its share; only the first writes files.
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        shutil.rmtree(partial, ignore_errors=True)
    args.output_dir = str(partial / "_work")  # the trainers' own files; the adapter goes to `out` when complete
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(recipe.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(recipe.base, dtype=torch.float32)
    lora = LoraConfig(r=recipe.rank, lora_alpha=2 * recipe.rank, lora_dropout=0.05, target_modules=TARGET_MODULES,
                      task_type="CAUSAL_LM")
    batch, fixed_steps = args.per_device_train_batch_size, args.max_steps  # a positive --max_steps fixes both phases
    if fixed_steps <= 0:
        args.max_steps = step_cap(len(sft_rows), args.num_train_epochs, batch, recipe.step_cap)
    if recipe.init_adapter:  # trainable from the given weights; the trainers take a PeftModel as it is
        model, lora = PeftModel.from_pretrained(model, recipe.init_adapter, is_trainable=True), None
    sft = SFTTrainer(model=model, processing_class=tokenizer, peft_config=lora, train_dataset=Dataset.from_list(sft_rows),
                     args=args, data_collator=end_to_end_collator(tokenizer, args, model), callbacks=[progress_callback("sft")])
    sft.remove_callback(PrinterCallback)  # our progress lines replace its raw dicts
    sft_result = sft.train()
    model = sft.model
    stats = {"sft_examples": len(sft_rows), "sft_steps": sft_result.global_step, "sft_loss": round(sft_result.training_loss, 4)}
    if dpo_rows and recipe.dpo_epochs > 0:
        # the SFT phase's settings, a fifth of its learning rate
        same = {k: getattr(args, k) for k in ("output_dir", "seed", "logging_steps", "report_to", "save_strategy",
                                              "per_device_train_batch_size", "lr_scheduler_type", "warmup_steps",
                                              "use_cpu", "disable_tqdm", "bf16", "gradient_checkpointing", "max_length")}
        steps = fixed_steps if fixed_steps > 0 else step_cap(len(dpo_rows), recipe.dpo_epochs, batch, recipe.step_cap)
        dpo = DPOTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(dpo_rows),
                         args=DPOConfig(num_train_epochs=recipe.dpo_epochs, beta=recipe.dpo_beta, max_steps=steps,
                                        learning_rate=args.learning_rate / 5, **same),
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
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    print(json.dumps({"phase": "done", "adapter": str(out), **stats}), flush=True)
    return 0


def main_all(recipe: Recipe, args) -> int:
    """`main` for the first adapter, then for each of `recipe.more` (the same flags, its own data, folder and start);
    one that fails (its traceback on stderr, no folder left) does not stop the next. The exit code is the first
    failure's, else 0: which adapters trained, their folders say (each is renamed into place only when complete)."""
    import copy
    import dataclasses
    import gc
    import traceback

    more = json.loads(Path(recipe.more).read_text()) if recipe.more else []
    pristine = copy.deepcopy(args)  # main changes its args (output_dir, max_steps): each run starts from the flags
    runs = [(recipe, args.output_dir)] + [
        (dataclasses.replace(recipe, data=m["data"], init_adapter=m.get("init_adapter"),
                             dpo_epochs=float(m.get("dpo_epochs", recipe.dpo_epochs))), m["output_dir"]) for m in more]
    first_failure = 0
    for r, out in runs:
        a = copy.deepcopy(pristine)
        a.output_dir = out
        try:
            code = main(dataclasses.replace(r, more=None), a)
        except Exception:  # noqa: BLE001 - the next adapter still trains
            print(f"training {out} failed:", file=sys.stderr, flush=True)
            traceback.print_exc()
            code = 1
        first_failure = first_failure or code
        gc.collect()  # the last model and trainer go before the next loads its own
        _empty_gpu_cache()
    return first_failure


def _empty_gpu_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    recipe, sft_args = make_parser().parse_args_and_config()
    sys.exit(main_all(recipe, sft_args))
