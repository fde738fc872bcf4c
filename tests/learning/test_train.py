"""The trainer's command line (TRL's parser) and its progress lines, and chatfb.learning.train on a tiny random
Llama built here (no download): a few LoRA steps must change the adapter's weights and leave the base
model's untouched (the check huggingface/trl's tests make)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from chatfb.learning import worker as nightly, train
from chatfb.app.admin import AdminService
from chatfb.ui.admin_tab import training_progress, training_step
from chatfb.config import Settings
from chatfb.learning.train import make_parser, progress_callback


@pytest.fixture(scope="module")
def parser():
    return make_parser()


def test_defaults_are_the_settings(parser):
    recipe, args = parser.parse_args_and_config(["--data", "d", "--base", "b", "--output_dir", "o"])
    s = Settings()
    assert (args.num_train_epochs, args.learning_rate, args.seed) == (s.train_epochs, s.learning_rate, s.seed)
    assert (recipe.rank, recipe.step_cap) == (s.lora_rank, s.train_max_steps)
    assert args.max_steps == -1 and args.logging_steps == 1 and args.report_to == []


def test_the_nightly_command_parses_to_its_settings(parser, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(nightly.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    s = Settings(lora_rank=4, train_epochs=2.5, learning_rate=0.002, seed=7, train_max_steps=9)
    nightly.train_adapter(s, Path("/models/base"), tmp_path / "work", tmp_path / "adapters" / "v1", dpo=True)
    assert calls[0][1:3] == ["-m", "chatfb.learning.train"]
    recipe, args = parser.parse_args_and_config(calls[0][3:])
    assert (recipe.data, recipe.base, args.output_dir) == (str(tmp_path / "work"), "/models/base",
                                                           str(tmp_path / "adapters" / "v1"))
    assert (recipe.rank, args.num_train_epochs, args.learning_rate, args.seed, recipe.step_cap, recipe.dpo_epochs) == \
        (4, 2.5, 0.002, 7, 9, 1.0)


def test_progress_is_one_json_object_per_step_and_the_admin_view_reads_it(capsys, tmp_path):
    cb = progress_callback("sft")
    state = SimpleNamespace(global_step=3, max_steps=12)
    cb.on_train_begin(None, state, None)
    cb.on_log(None, state, None, logs={"loss": 1.23456, "learning_rate": 0.001})
    cb.on_log(None, state, None, logs={"train_runtime": 5.0})  # the end-of-training summary: no progress line
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1
    step = json.loads(printed[0])
    assert {k: step[k] for k in ("phase", "step", "total", "loss")} == {"phase": "sft", "step": 3, "total": 12, "loss": 1.2346}
    assert isinstance(step["eta_s"], int) and step["eta_s"] >= 0

    log = tmp_path / "logs" / "nightly.log"
    log.parent.mkdir()
    log.write_text("\n".join([
        "2026-12-03 INFO chatfb.learning.worker training: python -m chatfb.learning.train ...",
        '{"phase": "sft", "step": 2, "total": 12, "loss": 1.5, "eta_s": 9}',  # an older step
        printed[0],
        '{"phase": "sft", "step": "x"}',  # not a progress line
        "step 11/12 loss 0.5 eta 1s",  # prose is not read any more
        '{"ok": true, "adapter": "chatfb-v0001"}',  # the cycle's summary
    ]) + "\n")
    admin = AdminService(None, SimpleNamespace(data_dir=tmp_path), cycles=SimpleNamespace(training_running=lambda: True))
    status, tail = training_progress(admin)
    assert status.startswith("**Learning cycle running:**") and "training: step 3 of 12, loss 1.2346" in status
    assert "chatfb.learning.train" not in tail and "eta_s" not in tail  # internal command and JSON stay in the file
    assert training_step("not json {") is None and training_step('{"step": 1}') is None


WORDS = ("hello hi there how can i help you our support email is support@chatfb.example what the capital of "
         "france paris say ok please").split()
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def tiny_model(folder):
    """A 2-layer Llama with a word-level tokenizer and a chat template, saved to `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<eos>", "<system>", "<user>", "<assistant>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=2, bos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run_trainer(argv):
    """The trainer's Python entry point, fed flags as the nightly cycle passes them (chatfb.learning.worker.train_adapter)."""
    return train.main(*train.make_parser().parse_args_and_config(argv))


def test_a_few_lora_steps_change_the_adapter_and_not_the_base(tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, data, out = tmp_path / "base", tmp_path / "data", tmp_path / "adapter"
    tiny_model(base)
    before = digest(base)
    data.mkdir()
    rows = [({"role": "user", "content": "how can i help"}, "our support email is support@chatfb.example"),
            ({"role": "user", "content": "what the capital of france"}, "paris"),
            ({"role": "user", "content": "say hello"}, "hi there")]
    # as the cycle writes them: feedback rows carry provenance, replay rows (the last) none
    mark = {"feedback_id": "f1", "author": "ann", "feedback_kind": "written_correction", "scope": "shared"}
    (data / "sft.jsonl").write_text("".join(json.dumps({"prompt": [p], "completion": [{"role": "assistant", "content": c}],
                                                        **(mark if i < 2 else {})}) + "\n" for i, (p, c) in enumerate(rows)))
    (data / "dpo.jsonl").write_text(json.dumps({"prompt": [rows[0][0]], "chosen": [{"role": "assistant", "content": rows[0][1]}],
                                                "rejected": [{"role": "assistant", "content": "ok"}], **mark}) + "\n")
    code = run_trainer(["--data", str(data), "--base", str(base), "--output_dir", str(out), "--rank", "4",
                        "--learning_rate", "0.01", "--per_device_train_batch_size", "2", "--max_steps", "3",
                        "--dpo_epochs", "1", "--max_length", "64"])
    assert code == 0
    stats = json.loads((out / "chatfb_train.json").read_text())
    assert stats["sft_steps"] == 3 and stats["dpo_steps"] == 3 and stats["sft_examples"] == 3

    # the adapter: LoRA weights only, and trained (PEFT starts every lora_B at zero)
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights), sorted(weights)
    lora_b = {k: w for k, w in weights.items() if "lora_B" in k}
    assert len(lora_b) == 2 * len(train.TARGET_MODULES)  # every target module of both layers
    assert all(w.abs().sum() > 0 for w in lora_b.values()), [k for k, w in lora_b.items() if not w.abs().any()]

    # the base: its files untouched, and the adapter changes what the model computes
    assert digest(base) == before and not list(base.glob("*.partial"))
    ids = torch.tensor([[4, 10, 12, 2, 5]])
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        base_logits = plain(ids).logits
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
        assert not torch.allclose(tuned(ids).logits, base_logits)
        assert torch.equal(tuned.get_base_model().model.embed_tokens.weight, plain.model.embed_tokens.weight)
        with tuned.disable_adapter():
            assert torch.allclose(tuned(ids).logits, base_logits)


def test_a_personal_adapter_trains_on_from_the_shared_adapters_weights_and_is_a_whole_lora(tmp_path):
    """--init_adapter (a personal adapter starts from the shared one): vLLM serves one LoRA per request, so the
    result must be a complete adapter on the base model, its weights moved on from the shared one's."""
    from safetensors.torch import load_file

    base, data = tmp_path / "base", tmp_path / "data"
    tiny_model(base)
    data.mkdir()
    (data / "sft.jsonl").write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}],
                                                        "completion": [{"role": "assistant", "content": a}]}) + "\n"
                                            for q, a in [("how can i help", "our support email is support@chatfb.example"),
                                                         ("say hello", "hi there")]))
    flags = ["--data", str(data), "--base", str(base), "--rank", "4", "--learning_rate", "0.01",
             "--per_device_train_batch_size", "2", "--max_steps", "2", "--dpo_epochs", "0", "--max_length", "64"]
    # the shared adapter's random lora_A start (seed 1) differs from a fresh one's (seed 0) far more than two steps move it
    assert run_trainer(flags + ["--output_dir", str(tmp_path / "shared"), "--seed", "1"]) == 0
    assert run_trainer(flags + ["--output_dir", str(tmp_path / "fresh"), "--seed", "0"]) == 0
    assert run_trainer(flags + ["--output_dir", str(tmp_path / "mine"), "--seed", "0",
                                "--init_adapter", str(tmp_path / "shared")]) == 0
    shared, fresh, mine = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("shared", "fresh", "mine"))
    assert set(mine) == set(shared)  # every module the shared adapter has: a whole LoRA, not a difference
    assert any(not (mine[k] == shared[k]).all() for k in mine)  # trained on
    lora_a = [k for k in mine if "lora_A" in k]
    to_shared = sum(float((mine[k] - shared[k]).norm()) for k in lora_a)
    to_fresh = sum(float((mine[k] - fresh[k]).norm()) for k in lora_a)
    assert to_shared < to_fresh / 4, (to_shared, to_fresh)  # from the shared weights, not from scratch
    config = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["r"] == 4


def test_one_trainer_process_trains_several_adapters_each_as_if_alone(tmp_path):
    """--more (a cycle's personal adapters, one trainer process): each adapter is the one a run of its own would
    have trained (the flags as given, the base loaded afresh: nothing carried over from the runs before it, such
    as the step count the first one's epochs set), and one that fails (no data) stops none after it."""
    from safetensors.torch import load_file

    base = tmp_path / "base"
    tiny_model(base)
    data = {"c": [("how can i help", "our support email is support@chatfb.example"), ("say hello", "hi there"),
                  ("say bye", "bye now")],  # 2 steps of 2 rows; a and b take 1 step each
            "a": [("what the capital of france", "paris")],
            "b": [("say hello", "hi there"), ("what the capital of france", "paris")]}
    for name, pairs in data.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "sft.jsonl").write_text("".join(json.dumps({
            "prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}) + "\n"
            for q, a in pairs))
    (tmp_path / "empty").mkdir()
    flags = ["--base", str(base), "--rank", "4", "--learning_rate", "0.01", "--per_device_train_batch_size", "2",
             "--num_train_epochs", "1", "--dpo_epochs", "0", "--max_length", "64", "--seed", "0"]
    assert run_trainer(flags + ["--data", str(tmp_path / "c"), "--output_dir", str(tmp_path / "shared"), "--seed", "1"]) == 0
    alone = {"a": [], "b": ["--init_adapter", str(tmp_path / "shared")]}
    for name, extra in alone.items():
        assert run_trainer(flags + ["--data", str(tmp_path / name), "--output_dir", str(tmp_path / f"{name}-alone")]
                           + extra) == 0
    more = tmp_path / "more.json"
    more.write_text(json.dumps([{"data": str(tmp_path / "empty"), "output_dir": str(tmp_path / "none")},
                                {"data": str(tmp_path / "a"), "output_dir": str(tmp_path / "a-together")},
                                {"data": str(tmp_path / "b"), "output_dir": str(tmp_path / "b-together"),
                                 "init_adapter": str(tmp_path / "shared"), "dpo_epochs": 0}]))
    code = train.main_all(*train.make_parser().parse_args_and_config(
        flags + ["--data", str(tmp_path / "c"), "--output_dir", str(tmp_path / "c-together"), "--more", str(more)]))
    assert code == 3 and not (tmp_path / "none").exists()  # no SFT examples: that one alone failed
    steps = {n: json.loads((tmp_path / f"{n}-together" / "chatfb_train.json").read_text())["sft_steps"] for n in "cab"}
    assert steps == {"c": 2, "a": 1, "b": 1}
    for name in alone:
        together = load_file(tmp_path / f"{name}-together" / "adapter_model.safetensors")
        by_itself = load_file(tmp_path / f"{name}-alone" / "adapter_model.safetensors")
        assert set(together) == set(by_itself)
        assert all(torch_close(together[k], by_itself[k]) for k in together), name


def torch_close(a, b) -> bool:
    import torch

    return bool(torch.allclose(a, b, atol=1e-6))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_rows_laid_end_to_end_give_the_loss_of_a_padded_batch(tmp_path, attention):
    """The trainer's SFT batches lay their rows end to end (train.end_to_end_collator: no padding to the longest
    row). That is only the same training while the model keeps each row's attention to itself and the first token
    of a row is not predicted from the row before it: the loss of rows of different lengths, laid end to end, must
    be the padded batch's (the model as TRL's SFT calls it: no cache)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tiny_model(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attention).eval()
    args = train.make_parser().parse_args_and_config(["--data", "d", "--base", "b", "--output_dir", "o"])[1]
    rows = []
    for prompt, answer in [("say hello", "hi there how can i help"), ("what the capital of france", "paris"),
                           ("how can i help", "our support email is support@chatfb.example please say ok")]:
        p = tokenizer(f"<user> {prompt} <eos> <assistant> ")["input_ids"]
        a = tokenizer(f"{answer} <eos>")["input_ids"]
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    collator = train.end_to_end_collator(tokenizer, args, model)
    assert collator is not None and not model.training  # the model was asked, and left as it was
    packed = collator(rows)
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(rows)
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))  # no padding
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]]), use_cache=False)
                 for r in rows]
        together, batch = (model(**b, use_cache=False).loss for b in (packed, padded))
    assert torch.allclose(together, batch, atol=1e-5), (together, batch)
    tokens = [sum(x != -100 for x in r["labels"][1:]) for r in rows]  # the tokens each row's loss averages over
    mean = sum(float(o.loss) * n for o, n in zip(alone, tokens)) / sum(tokens)
    assert abs(float(together) - mean) < 1e-5
    # flags that ask TRL for padding-free or packing themselves keep TRL's own collator
    for flags in (["--padding_free", "True", "--max_length", "None"], ["--packing", "True"]):
        asked = train.make_parser().parse_args_and_config(["--data", "d", "--base", "b", "--output_dir", "o", *flags])[1]
        assert train.end_to_end_collator(tokenizer, asked, model) is None, flags


def test_a_model_that_mixes_rows_laid_end_to_end_trains_on_padded_batches(tmp_path, monkeypatch):
    """Not every model a --base may name keeps rows laid end to end apart (a mask built without position ids,
    recurrent layers): the trainer asks the model itself, and one that mixes them gets TRL's padded batches."""
    import transformers.masking_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_model(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).train()
    args = train.make_parser().parse_args_and_config(["--data", "d", "--base", "b", "--output_dir", "o"])[1]
    assert train.keeps_rows_apart(model) and model.training  # asked in eval mode, left in training mode
    # a model whose attention sees across rows: as if transformers did not look for rows in the position ids
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert not train.keeps_rows_apart(model)
    assert train.end_to_end_collator(tokenizer, args, model) is None
