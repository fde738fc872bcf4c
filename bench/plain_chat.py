"""The anchor of bench/app_bench.py: a plain `gr.ChatInterface` streaming an OpenAI-compatible model
through the `openai` client, one Gradio update per streamed chunk, and nothing else (no store, no
feedback, no sessions). What one Gradio process serves this way is the bar chatfb's app is held to.

    python -m bench.plain_chat --model-url http://127.0.0.1:8000 --port 7861 [--concurrency 16]
"""

from __future__ import annotations

import argparse

from bench.server import SERVED_NAME


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.plain_chat", description=__doc__.split("\n")[0])
    p.add_argument("--model-url", required=True, help="the OpenAI-compatible server (without /v1)")
    p.add_argument("--port", type=int, required=True, help="port to serve the chat on (127.0.0.1)")
    p.add_argument("--concurrency", type=int, default=16, help="chat events Gradio runs at once")
    p.add_argument("--max-tokens", type=int, default=64)
    return p


def text_of(content) -> str:
    """A history item's text: Gradio hands content back as a string or a list of text parts."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    import gradio as gr
    from openai import OpenAI

    client = OpenAI(base_url=args.model_url + "/v1", api_key="none")

    def respond(message: str, history: list[dict], system_prompt: str):
        messages = [{"role": "system", "content": system_prompt}]
        messages += [{"role": m["role"], "content": text_of(m["content"])} for m in history]
        messages.append({"role": "user", "content": message})
        text = ""
        for chunk in client.chat.completions.create(model=SERVED_NAME, messages=messages, stream=True,
                                                    max_tokens=args.max_tokens):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                yield text

    demo = gr.ChatInterface(respond, additional_inputs=[gr.Textbox("You are a helpful assistant.", label="System")],
                            concurrency_limit=args.concurrency, api_name="chat")
    print("plain chat ready", flush=True)
    demo.launch(server_name="127.0.0.1", server_port=args.port, show_error=False)


if __name__ == "__main__":
    main()
