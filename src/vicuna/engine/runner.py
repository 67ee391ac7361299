"""The model's forward pass for one generation: prefill the prompt, then one token at a time.

Two runners with one interface. `HFRunner` calls the transformers model with its dynamic cache and
runs any architecture and any placement. `LlamaRunner` runs LLaMA-architecture weights on one device
with a preallocated KV cache and a forward of a few fused operations per layer (q/k/v in one matmul,
gate/up in one matmul): at batch 1 a step's time goes to per-operation overhead rather than
arithmetic, so fewer, larger operations decode faster. Its logits match transformers' (tested).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from vicuna.engine.quant import Int8Linear, PackedHalf, PackedRows, native_half_matmul, packs_half

CACHE_CHUNK = 256  # the KV cache grows in steps of this many positions


def chunked(length: int) -> int:
    """Positions a KV cache (or rotary table) holds for `length` tokens: whole chunks."""
    return -(-length // CACHE_CHUNK) * CACHE_CHUNK


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
    return all(type(m) in (torch.nn.Linear, Int8Linear, PackedRows) for m in projections) and all(
        type(p.data) is torch.Tensor for p in model.parameters()
    )


Projection = Callable[[torch.Tensor], torch.Tensor]

UPCAST_ROWS = 16  # from this many rows a half-precision product on such a CPU is faster in float32


class Dense:
    """`F.linear` on one weight. On a CPU without native half-precision matrix units, products of many
    rows (a prompt, a large batch) run in float32 on a float32 copy of the weight made for that one
    product: a 500-token prompt prefills ~4x faster. One-row decode steps, bandwidth-bound, stay in the
    weight's dtype."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.upcast = weight.device.type == "cpu" and not native_half_matmul(weight.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.upcast and x.shape[0] >= UPCAST_ROWS:
            return F.linear(x.float(), self.weight.float()).to(x.dtype)
        return F.linear(x, self.weight)


def fuse(parent: torch.nn.Module, *names: str) -> Projection:
    """One product for several Linear layers of `parent` that read the same input. The layers' weights
    become views into the fused weight, or, where the CPU multiplies FBGEMM's packed float16 fastest,
    rows of one packed matrix that replaces them; either way the model keeps working and no memory is
    added."""
    linears = [getattr(parent, name) for name in names]
    if isinstance(linears[0], Int8Linear):
        return Int8Linear.fuse(*linears)
    if isinstance(linears[0], PackedRows):  # packed by an earlier `LlamaWeights` of this model
        return linears[0].packed
    weight = linears[0].weight.data if len(linears) == 1 else torch.cat([m.weight.data for m in linears])
    if packs_half(weight):
        packed, row = PackedHalf(weight), 0
        for name, m in zip(names, linears, strict=True):
            setattr(parent, name, PackedRows(packed, row, row + m.out_features))
            row += m.out_features
        return packed
    row = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[row : row + rows]
        row += rows
    return Dense(weight)


def single(parent: torch.nn.Module, name: str) -> Projection:
    """A Linear layer of `parent` as a projection (packed like `fuse`'s). An output head tied to the token
    embedding is packed as a copy, since the embedding still needs its rows: vocabulary x hidden x 2
    bytes more (54 MiB for the built-in model), for a head that is as fast as the rest in batches."""
    linear = getattr(parent, name)
    return linear if isinstance(linear, Int8Linear) else fuse(parent, name)


class LlamaWeights:
    """The model's tensors regrouped for few operations per layer, and the rotary tables (shared by
    every generation)."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.config = config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.inter = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.rotary = model.model.rotary_emb
        inner = model.model
        self.dtype, self.device = inner.norm.weight.dtype, inner.norm.weight.device
        self.embed, self.head = inner.embed_tokens, single(model, "lm_head")

        def regroup(layer: Any) -> tuple[Projection, ...]:
            return (
                fuse(layer.self_attn, "q_proj", "k_proj", "v_proj"),
                single(layer.self_attn, "o_proj"),
                fuse(layer.mlp, "gate_proj", "up_proj"),
                single(layer.mlp, "down_proj"),
            )

        # FBGEMM packs one matrix on one thread (~60M weights/s): layers are packed side by side, a few
        # at a time, since each holds a float32 copy of its largest matrix while it is packed
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            projections = list(pool.map(regroup, inner.layers))
        # Packed products take and give float32 rows, so with every product packed the rows between them
        # stay in float32 (the KV cache keeps the model's dtype): no rounding to 16 bits after each
        # product, which keeps a batched reply far closer to the same reply computed alone.
        packed = all(isinstance(p, PackedHalf) for p in [self.head, *(p for ps in projections for p in ps)])
        self.act_dtype = torch.float32 if packed else self.dtype
        self.norm = self.norm_weight(inner.norm)
        self.layers = [
            (
                self.norm_weight(layer.input_layernorm),
                qkv,
                out,
                self.norm_weight(layer.post_attention_layernorm),
                gate_up,
                down,
            )
            for layer, (qkv, out, gate_up, down) in zip(inner.layers, projections, strict=True)
        ]
        self._rope = torch.empty(2, 0, self.head_dim, dtype=self.act_dtype, device=self.device)

    def rope(self, length: int) -> torch.Tensor:
        """cos and sin for positions 0..length-1, [2, positions, head_dim], sin with its first half negated
        (see `rotate`). Grown in whole cache chunks; a table already handed out is never changed."""
        if length > self._rope.shape[1]:
            size = chunked(length)
            probe = torch.zeros(1, 1, device=self.device)  # float32 tables, rounded below
            cos, sin = self.rotary(probe, torch.arange(size, device=self.device)[None])
            half = self.head_dim // 2
            sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
            self._rope = torch.stack([cos[0], sin]).to(self.act_dtype)
        return self._rope

    def norm_rows(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of each row. On the CPU it is computed as the layer norm of [x, -x]: that vector's mean
        is zero and its variance is x's mean square, so PyTorch's fused layer_norm kernel gives
        x / sqrt(mean(x^2) + eps) in half the time of `rms_norm`, which it composes of seven operations
        there (a decode step makes 61 such calls in the built-in model)."""
        width = x.shape[-1]
        if self.device.type != "cpu":
            return F.rms_norm(x, (width,), weight, self.eps)
        both = torch.cat([x, -x], dim=-1)
        return F.layer_norm(both, (2 * width,), weight, None, self.eps)[..., :width]

    def norm_weight(self, norm: torch.nn.Module) -> torch.Tensor:
        """A norm's weight as `norm_rows` takes it: on the CPU repeated, to scale both halves."""
        weight = norm.weight.to(self.act_dtype)
        return torch.cat([weight, weight]) if self.device.type == "cpu" else weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [..., head_dim]: x * cos + rotate_half(x) * sin. With the sign of rotate_half
    moved into `sin`, rotating half becomes swapping the two halves: three operations in all."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin)


class LlamaRunner:
    """One generation's KV cache, [layers, 2 (keys, values), kv_heads, positions, head_dim], and its
    position; `prefill` and `step` run the fused forward on it."""

    def __init__(self, weights: LlamaWeights, cache: torch.Tensor | None):
        self.w = weights
        self.cache: torch.Tensor | None = None
        # per layer: keys, values [1, kv_heads, positions, head_dim], views into the cache
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pos = 0
        if cache is not None:
            self.use(cache)

    def use(self, cache: torch.Tensor) -> None:
        self.cache = cache
        self.layers = [(layer[None, 0], layer[None, 1]) for layer in cache]

    @property
    def capacity(self) -> int:
        return 0 if self.cache is None else self.cache.shape[3]

    def reserve(self, length: int) -> None:
        """Make room in the KV cache for `length` positions."""
        have = self.capacity
        if length <= have:
            return
        w = self.w
        size = chunked(length)
        cache = torch.zeros(len(w.layers), 2, w.kv_heads, size, w.head_dim, dtype=w.dtype, device=w.device)
        if self.cache is not None:
            cache[:, :, :, :have] = self.cache
        self.use(cache)

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store layer i's k, v [kv_heads, head_dim] at this position and attend to every position so far
        with q [1, kv_heads, heads per KV head, head_dim]."""
        keys, values = self.layers[i]
        keys.select(2, self.pos).copy_(k)
        values.select(2, self.pos).copy_(v)
        end = self.pos + 1
        return F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end])

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """The prompt from position 0: float32 logits for the next token."""
        w, n = self.w, len(prompt_ids)
        self.pos = 0
        self.reserve(n)
        cos, sin = w.rope(n)[:, :n, None]  # [n, 1, head_dim]
        heads, kv_heads, dim = w.heads, w.kv_heads, w.head_dim
        rotated = (heads + kv_heads) * dim
        x = w.embed(torch.tensor(prompt_ids, device=w.device)).to(w.act_dtype)  # [n, hidden]
        for i, (norm1, qkv, out, norm2, gate_up, down) in enumerate(w.layers):
            mixed = qkv(w.norm_rows(x, norm1))
            qk = rotate(mixed[:, :rotated].view(n, heads + kv_heads, dim), cos, sin).transpose(0, 1)
            v = mixed[:, rotated:].view(n, kv_heads, dim).transpose(0, 1)
            self.cache[i, 0, :, :n], self.cache[i, 1, :, :n] = qk[heads:], v
            attn = F.scaled_dot_product_attention(
                qk[None, :heads], qk[None, heads:], v[None], is_causal=True, enable_gqa=True
            )
            x = x + out(attn[0].transpose(0, 1).reshape(n, heads * dim))
            x = x + mlp(w, x, norm2, gate_up, down)
        self.pos = n
        return w.head(w.norm_rows(x[-1:], w.norm))[0].float()

    def step(self, token_id: int) -> torch.Tensor:
        """The token after the last one: float32 logits for the next."""
        return decode(self.w, [self], [token_id])[0]


def mlp(w: LlamaWeights, x: torch.Tensor, norm: torch.Tensor, gate_up: Projection, down: Projection):
    gate, up = gate_up(w.norm_rows(x, norm)).split(w.inter, dim=-1)
    return down(F.silu(gate) * up)


@torch.inference_mode()
def decode(w: LlamaWeights, runners: Sequence[LlamaRunner], tokens: list[int]) -> torch.Tensor:
    """One token for each runner, each at its own position: float32 logits [rows, vocab].

    Every matrix product runs once for all rows; attention runs row by row over each row's own cache. In
    a step the query heads that share a KV head are that head's query rows: one grouped call of the
    fused attention kernel, several times faster than its general GQA path."""
    n, heads, kv_heads, dim = len(tokens), w.heads, w.kv_heads, w.head_dim
    group, rotated = heads // kv_heads, (heads + kv_heads) * dim
    for r in runners:
        r.reserve(r.pos + 1)
    table = w.rope(max(r.pos for r in runners) + 1)
    if n == 1:
        cos, sin = table[:, runners[0].pos, None]  # [1, head_dim]
    else:
        cos, sin = table[:, [r.pos for r in runners], None]  # [rows, 1, head_dim]
    x = w.embed(torch.tensor(tokens, device=w.device)).to(w.act_dtype)  # [rows, hidden]
    for i, (norm1, qkv, out, norm2, gate_up, down) in enumerate(w.layers):
        mixed = qkv(w.norm_rows(x, norm1))
        qk = rotate(mixed[:, :rotated].view(n, heads + kv_heads, dim), cos, sin)
        values = mixed[:, rotated:].view(n, kv_heads, dim)
        q = qk[:, :heads].view(n, 1, kv_heads, group, dim).to(w.dtype)  # the cache's dtype
        rows = [
            r.attend(i, q[b], qk[b, heads:], values[b]).view(1, heads * dim) for b, r in enumerate(runners)
        ]
        x = x + out(rows[0] if n == 1 else torch.cat(rows))
        x = x + mlp(w, x, norm2, gate_up, down)
    for r in runners:
        r.pos += 1
    return w.head(w.norm_rows(x, w.norm)).float()
