"""Parameters trained and GPU memory per split fine-tune: full fine-tune against LoRA.

Prints the tables of docs/training.md: `python examples/memory_estimate.py`. Parameter counts
come from each model's published config (the shapes below), written out per architecture; the
tests check them, and the LoRA counts, against the models transformers and PEFT build.

Memory per GPU, in bytes, for P parameters of which T are trained, on N GPUs:

    full, float32 (taskvec's default; --precision bf16 autocast keeps the same float32 state):
        weights 4P + gradients 4P + Adam moments 8P                          = 16P
    full, bf16 with DeepSpeed ZeRO-3 (the paper's 7B recipe):
        bf16 weights 2P + bf16 gradients 2P + float32 master 4P + Adam 8P    = 16P / N
    LoRA, base frozen in bf16 (--model-dtype bfloat16), adapter in float32:
        base 2P + adapter weights 4T + gradients 4T + Adam moments 8T        = 2P + 16T
    plus activations, per GPU (Korthikanti et al. 2022, 16-bit, attention by SDPA/flash, so no
    b*h*s*s score matrix kept), for batch b, sequence s, width d, L layers, vocabulary V:
        34 s b d L            without gradient checkpointing (x2 if activations are float32)
        2 s b d L + 34 s b d  with it (layer inputs kept, one layer recomputed at a time)
        + 8 s b V             float32 logits and their gradient
Not counted: the CUDA context and allocator slack (about 1-2 GB), temporary buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Model:
    name: str
    kind: str  # "gpt2", "phi" or "llama": how the layers are built
    layers: int
    width: int
    intermediate: int
    vocab: int
    positions: int = 0  # learned position embeddings (GPT-2 only)
    batch: int = 16  # per-device batch of the paper's recipe for this model

    def parameters(self) -> int:
        d, i, v, n = self.width, self.intermediate, self.vocab, self.layers
        if self.kind == "gpt2":  # c_attn d x 3d, c_proj d x d, c_fc d x i, c_proj i x d (all with bias), 2 LayerNorms
            layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * i + i) + (i * d + d) + 2 * 2 * d
            return v * d + self.positions * d + n * layer + 2 * d  # lm_head tied to wte
        if self.kind == "phi":  # q, k, v, dense d x d; fc1 d x i, fc2 i x d (all with bias); 1 LayerNorm
            layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * d
            return v * d + n * layer + 2 * d + (d * v + v)  # untied lm_head with bias
        if self.kind == "llama":  # q, k, v, o d x d; gate, up d x i, down i x d (no bias); 2 RMSNorms
            layer = 4 * d * d + 3 * d * i + 2 * d
            return v * d + n * layer + d + d * v  # untied lm_head
        raise ValueError(self.kind)

    def lora_parameters(self, rank: int) -> int:
        """r (in + out) per adapted (in x out) matrix, on PEFT's default target modules."""
        d, i = self.width, self.intermediate
        shapes = {"gpt2": [(d, 3 * d)],  # c_attn
                  "phi": [(d, d), (d, d), (d, i), (i, d)],  # q_proj, v_proj, fc1, fc2
                  "llama": [(d, d), (d, d)]}[self.kind]  # q_proj, v_proj
        return self.layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes)

    def activations(self, seq: int, checkpointing: bool, fp32: bool) -> int:
        s, b, d, n = seq, self.batch, self.width, self.layers
        kept = (2 * s * b * d * n + 34 * s * b * d) if checkpointing else 34 * s * b * d * n
        return kept * (2 if fp32 else 1) + 8 * s * b * self.vocab


MODELS = [
    Model("GPT-2 small", "gpt2", 12, 768, 3072, 50257, positions=1024),
    Model("GPT-2 medium", "gpt2", 24, 1024, 4096, 50257, positions=1024),
    Model("GPT-2 large", "gpt2", 36, 1280, 5120, 50257, positions=1024),
    Model("Phi-1.5", "phi", 24, 2048, 8192, 51200),
    Model("Llama-2-7B", "llama", 32, 4096, 11008, 32000, batch=4),
]
SEQ = 128  # --max-length


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def tables() -> str:
    rows = ["| model | parameters P | LoRA r=8: T | LoRA r=16: T | Adam moments 8P, full | 8T, LoRA r=16 |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for m in MODELS:
        p, t8, t16 = m.parameters(), m.lora_parameters(8), m.lora_parameters(16)
        rows.append(f"| {m.name} | {p / 1e6:,.1f}M | {t8 / 1e6:.2f}M ({100 * t8 / p:.2f}%) | {t16 / 1e6:.2f}M | "
                    f"{gib(8 * p)} | {8 * t16 / 2**20:.0f} MiB |")
    rows += ["", "| model | batch | full fp32, 1 GPU | + grad. ckpt | full bf16 ZeRO-3 + ckpt, 4 GPUs | 8 GPUs "
             "| LoRA r=16, bf16 base, 1 GPU | + grad. ckpt |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in MODELS:
        p, t = m.parameters(), m.lora_parameters(16)
        full = [16 * p + m.activations(SEQ, ckpt, fp32=True) for ckpt in (False, True)]
        zero3 = [16 * p / n + m.activations(SEQ, True, fp32=False) for n in (4, 8)]
        lora = [2 * p + 16 * t + m.activations(SEQ, ckpt, fp32=False) for ckpt in (False, True)]
        rows.append(f"| {m.name} | {m.batch} | " + " | ".join(map(gib, full + zero3 + lora)) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(tables())
