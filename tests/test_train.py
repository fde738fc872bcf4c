"""chatfb.train on a tiny random Llama built here (no download): a few LoRA steps must change the
adapter's weights and leave the base model's untouched (the check huggingface/trl's tests make)."""

import hashlib
import json

import pytest

from chatfb import train

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
    """The trainer's Python entry point, fed the flags the nightly cycle passes (chatfb.nightly.train_adapter)."""
    return train.main(train.make_parser().parse_args(argv))


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
    (data / "sft.jsonl").write_text("".join(json.dumps({"prompt": [p], "completion": [{"role": "assistant", "content": c}]})
                                            + "\n" for p, c in rows))
    (data / "dpo.jsonl").write_text(json.dumps({"prompt": [rows[0][0]], "chosen": [{"role": "assistant", "content": rows[0][1]}],
                                                "rejected": [{"role": "assistant", "content": "ok"}]}) + "\n")
    code = run_trainer(["--data", str(data), "--base", str(base), "--out", str(out), "--rank", "4", "--lr", "0.01",
                        "--batch-size", "2", "--max-steps", "3", "--dpo-epochs", "1", "--max-length", "64"])
    assert code == 0
    stats = json.loads((out / "chatfb_train.json").read_text())
    assert stats["sft_steps"] == 3 and stats["dpo_steps"] == 1 and stats["sft_examples"] == 3

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
