"""The text stage for real captions and the caption sources that feed it.

    prompt           the one prompt format (JSON chat / IP2P completion) and the one parser
    protocol         request/reply types, the backend protocol, TextServerError
    llm              the LLM backend registry, the LLM edits component (re-exports the protocol types)
    hf_backend       transformers (any causal LM, CPU/GPU, GGUF)      -- torch imported lazily
    vllm_backend     vLLM offline, JSON-schema structured outputs     -- vllm imported lazily
    openai_backend   OpenAI-compatible HTTP server (stdlib urllib)
    keywords         keyword substitution with instruction templates (no model)
    sources          caption pools from files / HF datasets on disk, LLM-written captions
    assign, dedup    deterministic caption assignment, near-duplicate removal

Nothing here imports torch, transformers or vllm at import time.
"""
