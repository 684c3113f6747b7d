"""`vllm` text backend: offline batched inference on GPUs (the `vllm` extra; imported lazily).

Chat models: one `LLM.chat` call per stage batch, replies constrained to the JSON schema.
The constraint is `SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))`
(vllm >= 0.11, the only spelling from 0.12 on, incl. 0.33); vllm <= 0.10 spells it
`guided_decoding=GuidedDecodingParams(json=schema)`. If neither exists we refuse to run rather than
silently generate unconstrained text. Base models: `LLM.generate` on the completion prompt with
the `\\nEND` stop. Every request has its own seed and an explicit `max_tokens` (vllm's default
of 16 silently truncates JSON); `finish_reason == "length"` is reported as truncated.
"""
from __future__ import annotations

import importlib

from .protocol import Reply, Request, prompt_format


def structured_kwargs(schema: dict) -> dict:
    """The SamplingParams keyword that constrains output to `schema`, for this vllm version.
    Raises RuntimeError when vllm has neither spelling."""
    sp = importlib.import_module("vllm.sampling_params")
    cls = getattr(sp, "StructuredOutputsParams", None)
    if cls is not None:
        return {"structured_outputs": cls(json=schema)}
    cls = getattr(sp, "GuidedDecodingParams", None)
    if cls is not None:
        return {"guided_decoding": cls(json=schema)}
    raise RuntimeError("this vllm has neither StructuredOutputsParams nor GuidedDecodingParams; "
                       "set edits.llm.structured: false to run without the JSON constraint")


class VLLMGenerator:
    """`vllm` text backend; the engine is built on first use (RuntimeError when vllm is not installed)."""

    name = "vllm"

    def __init__(self, cfg):
        self.cfg = cfg
        self._llm = None
        self._format: str | None = None

    def _engine(self):
        if self._llm is None:
            try:
                import vllm
            except ImportError:
                raise RuntimeError("the vllm backend needs the vllm extra: pip install 'cirgen[vllm]' "
                                   "(a CUDA machine; see docs on its torch pins)") from None
            c = self.cfg
            model = f"{c.model.rstrip('/')}/{c.gguf_file}" if c.gguf_file else c.model
            kw = dict(model=model, dtype=c.dtype, seed=0, tensor_parallel_size=c.tensor_parallel_size,
                      max_model_len=c.max_model_len, gpu_memory_utilization=c.gpu_memory_utilization,
                      trust_remote_code=c.trust_remote_code)
            if c.revision:
                kw["revision"] = c.revision
            self._llm = vllm.LLM(**kw)
        return self._llm

    @property
    def format(self) -> str:
        """The prompt format: as configured, or for `auto` from the tokenizer's chat template (builds the engine)."""
        if self._format is None:
            self._format = prompt_format(self.cfg.format, lambda: self._engine().get_tokenizer())
        return self._format

    def describe(self) -> dict:
        """Model and sampling settings recorded per triplet."""
        c = self.cfg
        return {"model": c.model, "revision": c.revision, "dtype": c.dtype, "temperature": c.temperature,
                "top_p": c.top_p, "max_new_tokens": c.max_new_tokens}

    def sampling_params(self, r: Request):
        """vllm `SamplingParams` of request `r`: its seed and stops, `max_tokens` = `max_new_tokens`, the
        JSON-schema constraint when `r.schema` (RuntimeError from `structured_kwargs` if unsupported)."""
        from vllm import SamplingParams

        c = self.cfg
        kw = dict(n=1, temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_new_tokens,
                  seed=r.seed, repetition_penalty=c.repetition_penalty)
        if r.stop:
            kw["stop"] = list(r.stop)
        if r.schema is not None:
            kw.update(structured_kwargs(r.schema))
        return SamplingParams(**kw)

    def generate(self, requests: list[Request]) -> list[Reply]:
        """One reply per request, in order, from one `LLM.chat` (chat) or `LLM.generate` call; an output
        with no completion is a `server_error` reply, vllm's "length" finish a truncated one."""
        if not requests:
            return []
        llm = self._engine()
        params = [self.sampling_params(r) for r in requests]
        if self.format == "chat":
            kw = {"chat_template_kwargs": dict(self.cfg.chat_template_kwargs)} \
                if self.cfg.chat_template_kwargs else {}
            outs = llm.chat([r.messages for r in requests], sampling_params=params, use_tqdm=False, **kw)
        else:
            outs = llm.generate([r.prompt for r in requests], sampling_params=params, use_tqdm=False)
        replies = []
        for o in outs:
            if not o.outputs:
                replies.append(Reply(error="server_error"))
                continue
            co = o.outputs[0]
            replies.append(Reply(text=co.text or "",
                                 finish_reason="length" if co.finish_reason == "length" else "stop"))
        return replies
