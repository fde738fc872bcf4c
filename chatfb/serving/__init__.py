"""Model servers: the OpenAI client, the managed vLLM and its replicas, LoRA adapters, model files."""
