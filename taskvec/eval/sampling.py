"""Sampling continuations of prompts in batches, as toxicity evaluations do (nucleus sampling)."""

from __future__ import annotations

from collections.abc import Sequence

from taskvec.errors import TaskvecError


def generate(model, tokenizer, prompts: Sequence[str], *, samples: int = 25, max_new_tokens: int = 25,
             top_p: float = 0.9, temperature: float = 1.0, top_k: int = 0, batch_size: int = 50, seed: int = 0,
             prefix: str = "", progress: bool | None = None) -> list[dict]:
    """`samples` continuations of each prompt: [{"prompt_id", "prompt", "sample", "continuation"}].

    Nucleus sampling (top_k 0 disables top-k, as in the literature; the paper's code left
    transformers' default of 50 on). `prefix` is put before every prompt (the paper's protocol);
    the model sees it, but records keep the prompt without it and the continuation holds only
    the new tokens, so neither is scored. The k samples of a prompt are rows of the same
    left-padded batch of `batch_size` sequences, so long runs waste little on padding.
    Prompts longer than the model's context minus max_new_tokens keep their last tokens. The
    output depends on `seed` and `batch_size`; the global torch RNG is left as it was. The
    tokenizer is set to pad and truncate on the left (see model.prepare_tokenizer).
    """
    import torch

    from taskvec.eval.model import context_length, prepare_tokenizer
    from taskvec.progress import progress_bar

    if samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise TaskvecError("samples, max_new_tokens and batch_size must be at least 1")
    if not 0.0 < top_p <= 1.0 or not temperature > 0.0 or top_k < 0:
        raise TaskvecError(f"top_p must be in (0, 1], temperature positive and top_k at least 0 "
                           f"(got {top_p}, {temperature}, {top_k})")
    if not prompts or not all(prompts):
        raise TaskvecError("no prompts to generate from" if not prompts else "prompts must not be empty strings")
    max_prompt = context_length(model) - max_new_tokens
    if max_prompt < 1:
        raise TaskvecError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                           f"model's {context_length(model)} positions")
    jobs = [(i, j) for i in range(len(prompts)) for j in range(samples)]
    records = []
    prepare_tokenizer(tokenizer)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        with progress_bar(progress, total=len(jobs), desc="generating", unit="seq") as bar:
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start:start + batch_size]
                inputs = tokenizer([prefix + prompts[i] for i, _ in batch], return_tensors="pt", padding=True,
                                   truncation=True, max_length=max_prompt).to(model.device)
                output = model.generate(**inputs, do_sample=True, top_k=top_k, top_p=top_p,
                                        temperature=temperature, max_new_tokens=max_new_tokens,
                                        pad_token_id=tokenizer.pad_token_id)
                texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                records += [{"prompt_id": i, "prompt": prompts[i], "sample": j, "continuation": text}
                            for (i, j), text in zip(batch, texts, strict=True)]
                bar.update(len(batch))
    return records
