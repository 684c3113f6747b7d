"""Tiny causal LMs for the text-backend tests: no hub, built from a config in a temp folder.

`build_tokenizer` trains a byte-level BPE (the `tokenizers` library) on the prompt examples;
`save_random_lm` writes a randomly initialised Llama-style model beside it; `save_memorised_lm`
trains one for a few seconds until greedy decoding reproduces given completions exactly.
"""
from __future__ import annotations

from pathlib import Path

from datagen.text.prompt import (SEP_EDIT, edit_completion, edit_prompt, edit_reply_json,
                                 load_edit_examples)

SCRIPT = [  # (caption, what the memorised model writes, the outcome the parser must give)
    ("a dog running on the beach", f"make the dog a cat{SEP_EDIT}a cat running on the beach\nEND",
     "a cat running on the beach"),
    ("a red car on a street", f"make the car blue{SEP_EDIT}a blue car on a street\nEND", "a blue car on a street"),
    ("a bowl of apples", f"add a banana{SEP_EDIT}a bowl of apples and a banana\nEND",
     "a bowl of apples and a banana"),
    ("a lamp next to a bed", f"keep it as it is{SEP_EDIT}A lamp next to a bed.\nEND", "text_noop"),
    ("a boat on a lake", "make it a ship but forget the separator\nEND", "text_malformed"),
    ("a cat on a mat", f"{SEP_EDIT.strip()}\nEND", "text_malformed"),
]

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer(extra: list[str] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    exs = load_edit_examples()
    corpus = [edit_prompt(e.caption, []) + edit_completion(e) for e in exs]
    corpus += [edit_reply_json(e) for e in exs] + list(extra)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _model(vocab: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def save_random_lm(path: Path, chat: bool = False, seed: int = 0) -> Path:
    tok = build_tokenizer()
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    _model(len(tok), seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_memorised_lm(path: Path, pairs: list[tuple[str, str]], steps: int = 150) -> Path:
    """A model that continues prompt_i with completion_i (then EOS) under greedy decoding."""
    import torch

    tok = build_tokenizer([p + c for p, c in pairs])
    model = _model(len(tok), 0)
    texts = [p + c + tok.eos_token for p, c in pairs]
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.clone()
    labels[enc.attention_mask == 0] = -100
    threads = torch.get_num_threads()
    torch.set_num_threads(1)               # tiny matrices: threads only add overhead
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            loss = model(**enc, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
