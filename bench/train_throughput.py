"""Training throughput (tokens/s, MFU) of a LLaMA-2-13B-wide model with fewer layers on one GPU.

A full 13B does not train on one GPU even with ZeRO-3, so this times the 13B's layer shape
(hidden 5120, MLP 13824, 40 heads, vocab 32000) with ``--layers`` of them, built in bf16
directly on the GPU, trained with the paper's optimiser settings (AdamW 0.9/0.95, eps 1e-8,
fused) on random tokens of the sequence length CapsFusion rows have (prompt ~180 + fused
caption ~60 tokens with the LLaMA tokenizer: 256 by default). Per-layer cost is what a 13B
step pays 40 times over; MFU counts 6 x params x tokens plus attention (12 x layers x hidden x
seq per token, causal) against the GPU's dense bf16 peak.

    python bench/train_throughput.py --layers 4 --batch 8 --seq-len 256 [--grad-ckpt]
    python bench/train_throughput.py --tiny --device cpu      # a smoke run of the script

Prints one JSON line. Record GPU figures in docs/benchmarks.md with the command and machine.
"""

from __future__ import annotations

import argparse
import json
import time

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}   # dense, SXM


def peak_tflops(name: str) -> float | None:
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in name:
            return v
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small model, to check the script")
    a = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if a.tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172,
                          num_attention_heads=4, num_key_value_heads=4,
                          num_hidden_layers=a.layers, max_position_embeddings=4096)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                          num_attention_heads=40, num_key_value_heads=40,
                          num_hidden_layers=a.layers, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    if a.grad_ckpt:
        (getattr(model, "activation_checkpointing_enable", None)
         or model.gradient_checkpointing_enable)()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.0, fused=dev.type == "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    ids = torch.randint(3, cfg.vocab_size, (a.batch, a.seq_len), device=dev)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(a.warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / a.steps
    tokens_s = a.batch * a.seq_len / dt
    # 6N per token (forward + backward) over the weight matmuls incl. the LM head; attention
    # scores and values: 12 * layers * hidden * seq / 2 (causal) per token
    flops_tok = 6 * (n_params - model.model.embed_tokens.weight.numel()) \
        + 6 * cfg.num_hidden_layers * cfg.hidden_size * a.seq_len
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_tflops(name)
    out = {"device": name, "layers": a.layers, "hidden": cfg.hidden_size, "batch": a.batch,
           "seq_len": a.seq_len, "grad_ckpt": a.grad_ckpt, "dtype": str(dtype),
           "params": n_params, "params_non_embedding": n_params - n_embed,
           "step_s": round(dt, 4), "tokens_per_s": round(tokens_s, 1),
           "model_tflops": round(flops_tok * tokens_s / 1e12, 2),
           "mfu": round(flops_tok * tokens_s / (peak * 1e12), 4) if peak else None,
           "peak_memory_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
           if dev.type == "cuda" else None,
           "tiny": a.tiny}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
