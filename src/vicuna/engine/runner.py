"""The model's forward pass for one generation: prefill the prompt, then one token at a time.

Two runners with one interface. `HFRunner` calls the transformers model with its dynamic cache and
runs any architecture and any placement. `LlamaRunner` runs LLaMA-architecture weights on one device
with a preallocated KV cache and a forward of a few fused operations per layer (q/k/v in one matmul,
gate/up in one matmul): at batch 1 a step's time goes to per-operation overhead rather than
arithmetic, so fewer, larger operations decode faster. Its logits match transformers' (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from vicuna.engine.quant import Int8Linear

CACHE_CHUNK = 256  # the KV cache grows in steps of this many positions


class Runner(Protocol):
    """Each call runs in inference mode itself: a generation is a generator that a server may resume
    on another thread, where a mode entered around the whole loop would not hold."""

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor: ...  # float32 logits for the next token
    def step(self, token_id: int) -> torch.Tensor: ...


class HFRunner:
    def __init__(self, model: Any, device: torch.device) -> None:
        from transformers import DynamicCache

        self.model, self.device = model, device
        self.cache = DynamicCache(config=model.config)

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt_ids], device=self.device)
        return (
            self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
            .logits[0, -1]
            .float()
        )

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        ids = torch.tensor([[token_id]], device=self.device)
        return self.model(input_ids=ids, cache=self.cache, use_cache=True).logits[0, -1].float()


def llama_fast_path_ok(model: Any) -> bool:
    """LLaMA weights on one device, plain or in our int8 layout: no biases, no offloaded or torchao tensors."""
    config = model.config
    if (
        getattr(config, "model_type", None) != "llama"
        or getattr(model, "hf_device_map", None)
        and len(set(model.hf_device_map.values())) > 1
    ):
        return False
    if config.attention_bias or config.mlp_bias or config.hidden_act != "silu":
        return False
    projections = [m for name, m in model.named_modules() if name.endswith("_proj")]
    return all(type(m) in (torch.nn.Linear, Int8Linear) for m in projections) and all(
        type(p.data) is torch.Tensor for p in model.parameters()
    )


Projection = Callable[[torch.Tensor], torch.Tensor]


def fuse(*linears: torch.nn.Module) -> Projection:
    """One product for several Linear layers that read the same input; the layers' own weights become
    views into the fused weight, so the model keeps working and no memory is added."""
    if isinstance(linears[0], Int8Linear):
        return Int8Linear.fuse(*linears)
    weight = torch.cat([m.weight.data for m in linears])
    row = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[row : row + rows]
        row += rows
    return partial(F.linear, weight=weight)


def single(linear: torch.nn.Module) -> Projection:
    return linear if isinstance(linear, Int8Linear) else partial(F.linear, weight=linear.weight)


class LlamaWeights:
    """The model's tensors regrouped for few operations per layer (shared by every generation)."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.config = config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.inter = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.rotary = model.model.rotary_emb
        inner = model.model
        self.embed, self.norm, self.head = inner.embed_tokens, inner.norm.weight, single(model.lm_head)
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = fuse(attn.q_proj, attn.k_proj, attn.v_proj)
            gate_up = fuse(mlp.gate_proj, mlp.up_proj)
            self.layers.append(
                (
                    layer.input_layernorm.weight,
                    qkv,
                    single(attn.o_proj),
                    layer.post_attention_layernorm.weight,
                    gate_up,
                    single(mlp.down_proj),
                )
            )
        self.dtype, self.device = self.norm.dtype, self.norm.device


class LlamaRunner:
    def __init__(
        self,
        weights: LlamaWeights,
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ):
        self.w = weights
        self.cache = (
            cache  # keys, values [layers, kv_heads, positions, head_dim]; cos, sin [positions, head_dim]
        )
        self.pos = 0

    def reserve(self, length: int) -> None:
        """Make room in the KV cache for `length` positions."""
        have = 0 if self.cache is None else self.cache[0].shape[2]
        if length <= have:
            return
        w = self.w
        size = -(-length // CACHE_CHUNK) * CACHE_CHUNK
        shape = (len(w.layers), w.kv_heads, size, w.head_dim)
        keys = torch.zeros(shape, dtype=w.dtype, device=w.device)
        values = torch.zeros_like(keys)
        if self.cache is not None:
            keys[:, :, :have], values[:, :, :have] = self.cache[0], self.cache[1]
        positions = torch.arange(size, device=w.device)[None]
        cos, sin = w.rotary(keys[:1, :1, :, 0], positions)
        self.cache = (keys, values, cos[0].to(w.dtype), sin[0].to(w.dtype))

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def forward(self, ids: list[int]) -> torch.Tensor:
        """The prompt at position 0, or one token after it."""
        w, start, n = self.w, self.pos, len(ids)
        assert n == 1 or start == 0, "tokens after the prompt come one at a time"
        self.reserve(start + n)
        keys, values, cos, sin = self.cache
        cos, sin = cos[start : start + n], sin[start : start + n]
        q_size, kv_size = w.heads * w.head_dim, w.kv_heads * w.head_dim
        x = w.embed(torch.tensor(ids, device=w.device))  # [n, hidden]
        for i, (norm1, qkv, out, norm2, gate_up, down) in enumerate(w.layers):
            h = F.rms_norm(x, (x.shape[-1],), norm1, w.eps)
            q, k, v = qkv(h).split([q_size, kv_size, kv_size], dim=-1)
            q = self.rotate(q.view(n, w.heads, w.head_dim).transpose(0, 1), cos, sin)
            keys[i, :, start : start + n] = self.rotate(
                k.view(n, w.kv_heads, w.head_dim).transpose(0, 1), cos, sin
            )
            values[i, :, start : start + n] = v.view(n, w.kv_heads, w.head_dim).transpose(0, 1)
            # prefill (start 0) is causal over the prompt; a decode step (n 1) sees every earlier position
            attn = F.scaled_dot_product_attention(
                q, keys[i, :, : start + n], values[i, :, : start + n], is_causal=n > 1, enable_gqa=True
            )
            x = x + out(attn.transpose(0, 1).reshape(n, q_size))
            h = F.rms_norm(x, (x.shape[-1],), norm2, w.eps)
            gate, up = gate_up(h).split([w.inter, w.inter], dim=-1)
            x = x + down(F.silu(gate) * up)
        self.pos += n
        last = F.rms_norm(x[-1:], (x.shape[-1],), w.norm, w.eps)
        return w.head(last)[0].float()

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        self.pos = 0
        return self.forward(prompt_ids)

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        return self.forward([token_id])
