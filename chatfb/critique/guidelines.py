"""Standing preferences ("guidelines"): critiques a user keeps as a lasting rule.

A user's own guidelines apply to their next replies at once; a guideline for everyone applies only
after an admin approved it. Guideline text is user data: it reaches the model quoted, inside one
fixed instruction appended to the system prompt of the requests it applies to, and never as a
system prompt of its own. A guideline with a literal, checkable shape (an opening or closing phrase,
a line marker, an address) is also applied by construction: the reply is held to its regex
(chatfb.critique.constraints.guideline_regex, vLLM structured outputs). The nightly cycle distils approved guidelines into the adapter
(replies made with the guideline in context, trained without it), so prompts need not grow forever.
"""

from __future__ import annotations

import re

# Short and imperative: a small model continued the earlier, longer header ("The user asked you to follow
# these preferences in every answer (quoted as they wrote them):") by reciting it and inventing preferences.
PREAMBLE = "Follow these rules in every reply:"
# What reads like a lasting rule rather than a remark on one reply: suggest "apply from now on".
RULE = re.compile(
    r"\b(?:always|never|every time|from now on|in future|in the future|each time|whenever|by default|"
    r"(?:our|my|the company'?s?) [\w -]{0,30}\b(?:is|are)\b|house style|don'?t ever|do not ever|please use|"
    r"use (?:british|american|metric|imperial|bullet|bullets)|no emojis?|without emojis?)\b", re.I)


def looks_like_rule(text: str) -> bool:
    """True when a critique reads like a standing preference ("always end with ...", "our support
    email is ...", "never use emoji"), so the UI suggests keeping it as a guideline."""
    return bool(RULE.search(text or ""))


# Chat-template control tokens (ChatML/SmolLM2, Llama 3, Llama 2/Mistral): vLLM renders the chat
# template to text and tokenizes it with special tokens recognised, so these written in user text
# would become real turn boundaries (a "<|im_start|>system" line in a guideline opens a system turn).
CHAT_MARKUP = re.compile(r"<\||\|>|\[/?INST\]|</?s>")


def inline(text: str) -> str:
    """User text made safe to quote inside an instruction: one line (it cannot start a fake
    instruction line), double quotes turned into single ones (it cannot close its quote), and
    chat-template tokens broken up with a space ("<|im_start|>" -> "< |im_start| >")."""
    one_line = " ".join((text or "").split()).replace('"', "'")
    return CHAT_MARKUP.sub(lambda m: m.group(0)[0] + " " + m.group(0)[1:], one_line)


def quote(text: str) -> str:
    """Guideline text as one quoted line (see `inline`)."""
    return '"' + inline(text) + '"'


def apply(messages: list[dict], texts: list[str]) -> list[dict]:
    """The chat messages with the guidelines appended to the system prompt (one is added when the
    conversation has none). Unchanged when there are no guidelines."""
    texts = list(dict.fromkeys(t for t in texts if (t or "").strip()))  # a suggester's own copy and the approved one
    if not texts:
        return messages
    block = PREAMBLE + "\n" + "\n".join(f"- {quote(t)}" for t in texts)
    if messages and messages[0]["role"] == "system":
        system = messages[0]["content"].rstrip()
        return [{"role": "system", "content": f"{system}\n\n{block}" if system else block}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]
