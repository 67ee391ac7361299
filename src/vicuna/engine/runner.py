"""The model's forward pass: prefill a prompt, then decode one token at a time, for one generation or
a batch of them.

Two runners with one interface. `HFRunner` calls the transformers model with its dynamic cache and
runs any architecture and any placement. `LlamaRunner` runs LLaMA-architecture weights on one device
with a preallocated KV cache shared by the rows of a batch, and a forward of a few fused operations per
layer (q/k/v in one product, gate/up in one product): at batch 1 a step's time would otherwise go to
per-operation overhead rather than to reading the weights. On the CPU the products, norms, gating,
residual adds and decode attention run in our kernel (`vicuna.engine.kernel`) where it runs, a whole
decode step in one call of it. On a CUDA GPU a decode step is PyTorch's operations, recorded once as a
CUDA graph and replayed for each token (`CudaGraphStep`). Its logits match transformers' (tested). A
prefill can start after a beginning already cached (`LlamaRunner.prefill`'s `start`): a chat's next
turn, or a request with another's system prompt, computes only its new tokens.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from vicuna.engine import int8_gpu, kernel, step_gpu
from vicuna.engine.quant import Int8Embedding, Int8Linear

CACHE_CHUNK = 256  # the KV cache grows in steps of this many positions


def shared_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many first tokens `a` and `b` have in common, up to `limit` (compared 64 at a time)."""
    n = 0
    while n < limit:
        end = min(n + 64, limit)
        if a[n:end] != b[n:end]:
            while a[n] == b[n]:
                n += 1
            return n
        n = end
    return n


def chunked(length: int) -> int:
    """Positions a KV cache (or rotary table) holds for `length` tokens: whole chunks."""
    return -(-length // CACHE_CHUNK) * CACHE_CHUNK


class Runner(Protocol):
    """Each call runs in inference mode itself: a generation is a generator that a server may resume
    on another thread, where a mode entered around the whole loop would not hold."""

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor: ...  # float32 logits for the next token
    def step(self, token_id: int) -> torch.Tensor: ...


def cache_arg(model: Any) -> str:
    """The name a transformers model's forward takes the KV cache by: `cache` in recent 5.x releases,
    `past_key_values` in earlier ones. A wrong name is taken silently as an unknown keyword, and each
    step is then computed without the tokens before it."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFRunner:
    def __init__(self, model: Any, device: torch.device) -> None:
        from transformers import DynamicCache

        self.model, self.device = model, device
        self.cache_kwargs = {cache_arg(model): DynamicCache(config=model.config), "use_cache": True}

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt_ids], device=self.device)
        return self.model(input_ids=ids, logits_to_keep=1, **self.cache_kwargs).logits[0, -1].float()

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        ids = torch.tensor([[token_id]], device=self.device)
        return self.model(input_ids=ids, **self.cache_kwargs).logits[0, -1].float()


# Rotary embeddings whose frequencies are the same for every position up to the context window, which
# `LlamaWeights.rope` then tabulates once from transformers' own module. Not longrope: once a sequence
# passes its original window it rotates every position at other frequencies (its long factors), and the
# fast path, still at the short ones, computed other logits than the model's.
TABLED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def llama_fast_path_ok(model: Any) -> bool:
    """LLaMA weights on one device, plain or in our int8 layout: no biases, nothing offloaded, a rotary
    embedding we tabulate (`TABLED_ROPE_TYPES`)."""
    config = model.config
    if (
        getattr(config, "model_type", None) != "llama"
        or getattr(model, "hf_device_map", None)
        and len(set(model.hf_device_map.values())) > 1
    ):
        return False
    if config.attention_bias or config.mlp_bias or config.hidden_act != "silu":
        return False
    if getattr(model.model.rotary_emb, "rope_type", "default") not in TABLED_ROPE_TYPES:
        return False
    projections = [m for name, m in model.named_modules() if name.endswith("_proj")]
    return all(type(m) in (torch.nn.Linear, Int8Linear, PackedLinear) for m in projections) and all(
        type(p.data) is torch.Tensor for p in model.parameters()
    )


UPCAST_ROWS = 16  # from this many rows a half-precision product on such a CPU is faster in float32
# Up to this many new tokens a prompt is computed as one kernel call (`Step` with `prompt`): no Python
# between the layers, and the decode attention for each new token. Built-in model, bf16, 2-core AVX2 VM:
# 1.3-1.9x faster for 2-8 tokens, 1.1-1.4x for 24-200, about even at 300-440 (PyTorch's attention over
# all the new tokens at once catches up), so longer prompts go layer by layer. Where the kernel
# multiplies with AVX512-BF16 (2-core Zen 5 VM), up to 1,024: 500 tokens 1.13x faster, 1,000 1.07x,
# 2,000 0.9x.
# A prompt is computed this many tokens at a time. In the server a decode step of the running replies comes
# between two pieces, so that a long prompt slows them instead of stopping them for its whole prefill, and a
# cancel (the web UI's Stop) takes effect between pieces; `Engine.generate` computes the same pieces, so a
# reply is the same batched or alone. Pieces cost nothing: 3,000 tokens of the built-in model took 2.9 s
# in pieces of 512 and 3.3 s whole (bf16, 2-core Zen 5 VM, best of 2).
PREFILL_PIECE = 512
PROMPT_STEP_ROWS = 256
DOT_PROMPT_STEP_ROWS = 1024


Norm = tuple[torch.Tensor, float]  # an RMSNorm's weight as `norm_weight` gives it, and its epsilon


def norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row. On the CPU it is computed as the layer norm of [x, -x]: that vector's mean
    is zero and its variance is x's mean square, so PyTorch's fused layer_norm kernel gives
    x / sqrt(mean(x^2) + eps) in half the time of `rms_norm`, which it composes of seven operations
    there. On a CUDA GPU it is `step_gpu.rms_norm` where the step's kernels run."""
    width = x.shape[-1]
    if x.device.type != "cpu":
        return (
            step_gpu.rms_norm(x, weight, eps)
            if step_gpu.runs_on(x.device)
            else F.rms_norm(x, (width,), weight, eps)
        )
    both = torch.cat([x, -x], dim=-1)
    return F.layer_norm(both, (2 * width,), weight, None, eps)[..., :width]


def norm_weight(norm: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A norm's weight as `norm_rows` takes it: on the CPU repeated, to scale both halves (the kernel
    reads the first half)."""
    weight = norm.weight.to(dtype)
    return torch.cat([weight, weight]) if weight.device.type == "cpu" else weight


class Dense:
    """The products with one weight, and what a layer does around them: a norm before (`norm`), the
    MLP's gating of its input (`gated`: silu(first half) * second half), a residual add after (`into`).

    On the CPU, products go through our kernel (`vicuna.engine.kernel`) where it runs: float32 rows in and
    out, the weight read as stored, the norm, gating and add done in the same call. Where PyTorch's own
    kernels multiply the weight's dtype natively (`kernel.pytorch_multiplies_natively`: 16-bit weights on
    a CPU with 16-bit matrix units, unless it is bfloat16 and our kernel uses AVX512-BF16 itself; float32
    ones on an AVX-512 CPU) only a decode step's few rows do, since PyTorch's kernels win on more; int8
    weights (`scales`) go through the kernel for any number of rows (for 5 to 256 rows about twice
    PyTorch's int8 product on a 2-core AVX2 EPYC). On a CUDA GPU int8
    weights go through `int8_gpu.product`, with the gating and the add in the same kernel. Otherwise
    PyTorch computes them: `fallback` (an int8 layer) or `F.linear`, where on a CPU without such units
    products of many rows (a prompt) run in float32 on a float32 copy of the weight made for that one
    product: a 500-token prompt prefills ~4x faster."""

    def __init__(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor | None = None,
        fallback: Int8Linear | None = None,
        packed: bool = False,
    ):
        self.weight, self.fallback = weight, fallback
        cpu = weight.device.type == "cpu"
        self.native = not cpu or (scales is None and kernel.pytorch_multiplies_natively(weight.dtype))
        runs = packed or kernel.runs_on(weight.device, weight.dtype)
        self.kernel = kernel.Weight(weight, scales, packed) if runs else None
        self.kernel_rows = kernel.FEW_ROWS if self.native and not packed else None  # None: any number

    def __call__(
        self, x: torch.Tensor, norm: Norm | None = None, gated: bool = False, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.kernel is not None and (self.kernel_rows is None or x.shape[0] <= self.kernel_rows):
            return self.kernel(x, norm, gated, into)  # float32, as the rows between products are
        if self.fallback is not None and int8_gpu.runs_on(x.device):  # the gating and add inside the product
            x = x if norm is None else norm_rows(x, *norm)
            return int8_gpu.product(x, self.weight, self.fallback.scales, gated=gated, into=into)
        if gated:
            x = step_gpu.gate(x)
        if norm is not None:
            x = norm_rows(x, *norm)
        if self.fallback is not None:
            y = self.fallback(x)
        elif not self.native and x.shape[0] >= UPCAST_ROWS:
            y = F.linear(x.float(), self.weight.float()).to(x.dtype)
        elif into is not None and into.dtype == x.dtype == self.weight.dtype:
            return into.addmm_(x, self.weight.t())  # the residual add in the product: one kernel on a GPU
        else:
            y = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return y if into is None else into.add_(y)


class PackedLinear(torch.nn.Module):
    """A Linear layer (no bias) whose weight is packed for our kernel (`kernel.pack_`), multiplied by it."""

    def __init__(self, weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.kernel = kernel.Weight(weight.data, packed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        return self.kernel(rows.float()).to(x.dtype).view(*x.shape[:-1], self.out_features)


class PackedEmbedding(torch.nn.Module):
    """A token embedding table that is also the output head, packed with it (`kernel.pack_`)."""

    def __init__(self, weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return kernel.packed_rows(self.weight.data, ids)


def fuse(parent: torch.nn.Module, *names: str) -> Dense:
    """One product for several Linear layers of `parent` that read the same input: their weights become
    views into the fused weight, so the model keeps working and no memory is added. Where the kernel
    multiplies the weight faster packed (`kernel.packs`) and each layer's rows start at a whole block, the
    fused weight is packed in place: bfloat16 layers become `PackedLinear`s of its rows, int8 ones are
    marked `packed`."""
    linears = [getattr(parent, name) for name in names]
    starts = [0, *itertools.accumulate(m.out_features for m in linears)]
    aligned = all(row % kernel.BLOCK == 0 for row in starts[1:-1])  # each layer's rows: whole blocks
    if isinstance(linears[0], Int8Linear):
        fused = linears[0] if len(linears) == 1 else Int8Linear.fuse(*linears)
        packed = all(m.packed for m in linears)
        if not packed and kernel.packs(fused.weight_int8) and aligned:
            kernel.pack_(fused.weight_int8)
            packed = True
        for m in {fused, *linears}:  # the layers' weights are views into the fused one
            m.packed = packed
        return Dense(fused.weight_int8, fused.scales.float(), fallback=fused, packed=packed)
    packed = all(isinstance(m, PackedLinear) for m in linears)
    weight = linears[0].weight.data if len(linears) == 1 else torch.cat([m.weight.data for m in linears])
    if not packed and kernel.packs(weight) and aligned:
        kernel.pack_(weight)
        packed = True
    if len(linears) == 1:
        if packed and not isinstance(linears[0], PackedLinear):
            setattr(parent, names[0], PackedLinear(linears[0].weight))
        return Dense(weight, packed=packed)
    for name, m, start, end in zip(names, linears, starts, starts[1:], strict=False):
        if packed:
            setattr(parent, name, PackedLinear(torch.nn.Parameter(weight[start:end], requires_grad=False)))
        else:
            m.weight.data = weight[start:end]
    return Dense(weight, packed=packed)


class LlamaWeights:
    """The model's tensors regrouped for few operations per layer, and the rotary tables (shared by
    every generation)."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.config = config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.rotary = model.model.rotary_emb
        inner = model.model
        self.dtype, self.device = inner.norm.weight.dtype, inner.norm.weight.device
        self.head = fuse(model, "lm_head")
        head, embed = model.get_output_embeddings(), inner.embed_tokens
        if isinstance(head, PackedLinear) and getattr(embed, "weight", None) is head.weight:
            model.set_input_embeddings(PackedEmbedding(head.weight))  # one table, packed with the head
        elif isinstance(embed, Int8Embedding) and embed.weight_int8 is getattr(head, "weight_int8", None):
            embed.packed = head.packed
        self.embed = inner.embed_tokens

        projections = [
            (
                fuse(layer.self_attn, "q_proj", "k_proj", "v_proj"),
                fuse(layer.self_attn, "o_proj"),
                fuse(layer.mlp, "gate_proj", "up_proj"),
                fuse(layer.mlp, "down_proj"),
            )
            for layer in inner.layers
        ]
        # Our kernel takes and gives float32 rows, so where it runs the rows between products stay in
        # float32 (the KV cache keeps the model's dtype): no rounding to 16 bits after each product,
        # which keeps a batched reply far closer to the same reply computed alone.
        on_kernel = kernel.runs_on(self.device, self.dtype)
        self.act_dtype = torch.float32 if on_kernel else self.dtype
        group = self.heads // self.kv_heads
        self.attend_kernel = on_kernel and kernel.attends(self.dtype, group, self.head_dim)

        def norm(module: torch.nn.Module) -> Norm:
            return norm_weight(module, self.act_dtype), self.eps

        self.norm = norm(inner.norm)
        self.layers = [
            (norm(layer.input_layernorm), qkv, out, norm(layer.post_attention_layernorm), gate_up, down)
            for layer, (qkv, out, gate_up, down) in zip(inner.layers, projections, strict=True)
        ]
        self._rope = torch.empty(2, 0, self.head_dim, dtype=self.act_dtype, device=self.device)
        # Where the kernel runs every product and the attention, a decode step is one kernel call.
        dense = [d for layer in projections for d in layer] + [self.head]
        self.step_kernel, self.step_rows = None, None
        dot = on_kernel and self.dtype == torch.bfloat16 and kernel.dot_bf16()  # bf16, int8: AVX512-BF16
        self.prompt_step_rows = DOT_PROMPT_STEP_ROWS if dot else PROMPT_STEP_ROWS
        if self.attend_kernel and all(d.kernel is not None for d in dense):
            norms = [n for layer in self.layers for n in (layer[0][0], layer[3][0])] + [self.norm[0]]
            self.step_kernel = kernel.Step(
                [tuple(d.kernel for d in layer) for layer in projections],
                self.head.kernel,
                norms,
                self.eps,
                self.heads,
                self.kv_heads,
                self.head_dim,
                self._embedding_kernel(),
                self.dtype,
            )
            self.step_rows = min((d.kernel_rows for d in dense if d.kernel_rows is not None), default=None)

    def _embedding_kernel(self) -> kernel.Weight:
        """The token embedding table as the kernel reads it (the head's, where the two are one tensor)."""
        if isinstance(self.embed, Int8Embedding):
            table, scales = self.embed.weight_int8, self.embed.scales
        else:
            table, scales = self.embed.weight.data, None
        head = self.head.kernel
        if head.weight.data_ptr() == table.data_ptr() and head.weight.shape == table.shape:
            return head
        return kernel.Weight(table, None if scales is None else scales.float())

    def one_call(self, rows: int) -> bool:
        """Whether a step of `rows` rows (or a prompt of `rows` new tokens) is one kernel call (`Step`)."""
        return self.step_kernel is not None and (self.step_rows is None or rows <= self.step_rows)

    def rope(self, length: int) -> torch.Tensor:
        """cos and sin for positions 0..length-1, [2, positions, head_dim], sin with its first half negated
        (see `rotate`). Grown in whole cache chunks; a table already handed out is never changed."""
        if length > self._rope.shape[1]:
            # transformers' rotary module at the frequencies it uses within the context window: past the
            # window, dynamic scaling would rescale every position (and the module's state with them)
            inv_freq = getattr(self.rotary, "original_inv_freq", self.rotary.inv_freq).float()
            angles = torch.arange(chunked(length), device=self.device)[:, None].float() * inv_freq
            scale = getattr(self.rotary, "attention_scaling", 1.0)
            cos, sin = angles.cos() * scale, angles.sin() * scale
            self._rope = torch.stack([cos.repeat(1, 2), torch.cat([-sin, sin], dim=-1)]).to(self.act_dtype)
        return self._rope


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [..., head_dim]: x * cos + rotate_half(x) * sin. With the sign of rotate_half
    moved into `sin`, rotating half becomes swapping the two halves: three operations in all."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin)


class LlamaRunner:
    """The KV cache of one or more generations (rows), [layers, 2 (keys, values), rows, kv_heads,
    positions, head_dim], and each row's length; `prefill` and `step` run the fused forward on it.

    `Engine.generate` runs one row. The batcher prefills each request in a runner of its own, then
    `join`s it to the batch's runner, whose rows share one rectangle of positions: a decode step attends
    for every row in one call (see `decode`), instead of one call per row.
    Rows that leave free their memory at once (the cache is copied); rows that join use room made for
    them in advance (`join`'s `slots`), or copy the cache."""

    def __init__(self, weights: LlamaWeights, cache: torch.Tensor | None):
        self.w = weights
        self.cache = cache
        self.lengths: list[int] = []  # tokens cached, per row
        self._graph: CudaGraphStep | None = None  # on a GPU: the recorded step for this cache and rows

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def slots(self) -> int:
        return 0 if self.cache is None else self.cache.shape[2]

    @property
    def capacity(self) -> int:
        """Positions each row holds (each slot, used or not)."""
        return 0 if self.cache is None else self.cache.shape[4]

    def reserve(self, rows: int, length: int, slots: int = 0) -> None:
        """Make room for `rows` rows of `length` positions, keeping what the rows hold; when the cache
        has to grow, it gets at least `slots` rows, so that rows about to join need no copy."""
        have = self.capacity
        if rows <= self.slots and length <= have:
            return
        w = self.w
        size = max(have, chunked(length))
        shape = (len(w.layers), 2, max(rows, slots), w.kv_heads, size, w.head_dim)
        # Our kernel's attention reads each row's positions up to its own: the rest need not be zeroed
        # (~1.5 ms a time for a 16-row cache, ~35 times in a 16-stream wave). PyTorch's attention reads
        # every position, the masked ones too, and a NaN there would leak through its zero weight.
        cache = (torch.empty if w.attend_kernel else torch.zeros)(shape, dtype=w.dtype, device=w.device)
        if self.rows:
            cache[:, :, : self.rows, :, :have] = self.cache[:, :, : self.rows]
        self.cache, self._graph = cache, None

    def join(self, other: LlamaRunner, slots: int = 0) -> None:
        """Add `other`'s one row (a prefilled generation) as this runner's last row (see `reserve` for
        `slots`)."""
        (length,) = other.lengths
        self.reserve(self.rows + 1, length, slots)
        self.cache[:, :, self.rows, :, :length] = other.cache[:, :, 0, :, :length]
        self.lengths.append(length)

    def keep(self, index: Sequence[int]) -> None:
        """Keep these rows, in this order, in a cache just large enough for their next step: the memory
        of the others is freed."""
        self.lengths = [self.lengths[i] for i in index]
        self._graph = None
        if not index:
            self.cache = None
            return
        size = chunked(max(self.lengths) + 1)
        self.cache = self.cache[:, :, :, :, :size][:, :, list(index)]

    def copy_prefix(self, other: LlamaRunner, row: int, length: int) -> None:
        """Make this runner's one row hold the first `length` positions of `other`'s row `row` (a
        generation whose tokens begin the same way as the next prompt; see `prefill`'s `start`)."""
        self.lengths = []
        self.reserve(1, length)
        self.cache[:, :, 0, :, :length] = other.cache[:, :, row, :, :length]
        self.lengths = [length]

    @torch.inference_mode()
    def prefill_more(self, prompt_ids: list[int], done: int, most: int) -> tuple[torch.Tensor, int]:
        """The next piece of a prompt whose first `done` tokens this row holds: up to `most` tokens more.
        Answers the logits after the piece and how many tokens the row then holds."""
        end = min(len(prompt_ids), done + most)
        return self.prefill(prompt_ids[:end], done), end

    def prefill(self, prompt_ids: list[int], start: int = 0) -> torch.Tensor:
        """The prompt as this runner's one row: float32 logits for the next token. With `start`, the row
        already holds the keys and values of the prompt's first `start` tokens (an earlier turn of the same
        chat, or another request with the same system prompt), and only the rest is computed."""
        w, n = self.w, len(prompt_ids)
        if not 0 <= start < n or (start and (self.rows != 1 or self.lengths[0] < start)):
            raise ValueError(f"prefill: cannot start at {start} of {n} tokens with rows of {self.lengths}")
        self.lengths = [start] if start else []
        if start and start == n - 1:  # one new token: a decode step
            return decode(w, self, prompt_ids[-1:])[0]
        self.reserve(1, n)
        m = n - start  # tokens computed
        if m <= w.prompt_step_rows and w.one_call(m):
            logits = w.step_kernel(prompt_ids[start:], w.rope(n), self.cache, range(start, n), prompt=True)
            self.lengths = [n]
            return logits[0]
        x = w.embed(torch.tensor(prompt_ids[start:], device=w.device)).to(w.act_dtype)  # [m, hidden]
        cos, sin = w.rope(n)[:, start:n, None]  # [m, 1, head_dim]
        heads, kv_heads, dim = w.heads, w.kv_heads, w.head_dim
        rotated = (heads + kv_heads) * dim
        mask = None  # from position 0: causal; else each new token sees the cached ones and itself
        if start:
            mask = torch.arange(n, device=w.device) <= torch.arange(start, n, device=w.device)[:, None]
        for i, (norm1, qkv, out, norm2, gate_up, down) in enumerate(w.layers):
            mixed = qkv(x, norm=norm1)
            qk = rotate(mixed[:, :rotated].view(m, heads + kv_heads, dim), cos, sin).transpose(0, 1)
            k, v = qk[heads:], mixed[:, rotated:].view(m, kv_heads, dim).transpose(0, 1)
            self.cache[i, 0, 0, :, start:n], self.cache[i, 1, 0, :, start:n] = k, v
            if start:
                k = torch.cat([self.cache[i, 0, 0, :, :start].to(k.dtype), k], dim=1)
                v = torch.cat([self.cache[i, 1, 0, :, :start].to(v.dtype), v], dim=1)
            attn = F.scaled_dot_product_attention(
                qk[None, :heads], k[None], v[None], attn_mask=mask, is_causal=not start, enable_gqa=True
            )
            out(attn[0].transpose(0, 1).reshape(m, heads * dim), into=x)
            down(gate_up(x, norm=norm2), gated=True, into=x)
        self.lengths = [n]
        return w.head(x[-1:], norm=w.norm)[0].float()

    def step(self, token_id: int) -> torch.Tensor:
        """The token after the last one (one row): float32 logits for the next."""
        return decode(self.w, self, [token_id])[0]

    def graphed_step(self, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """`decode`'s step on a CUDA GPU, replayed from the graph recorded for this cache and rows."""
        graph = self._graph
        if graph is None or graph.cache is not self.cache or graph.rows != len(tokens):
            graph = self._graph = CudaGraphStep(self.w, self.cache, len(tokens))
        return graph(tokens, positions)


@torch.inference_mode()
def decode(w: LlamaWeights, runner: LlamaRunner, tokens: list[int]) -> torch.Tensor:
    """One token for each of the runner's rows, each at its own position: float32 logits [rows, vocab].

    Every matrix product and every attention runs once for all rows. Where our kernel runs, a step of
    few rows is one call of it (`Step`), and for more rows one call per layer rotates q and k, stores k
    and v in the cache and attends, each row over its own length. Else the step is `step_in_pytorch`,
    replayed from a CUDA graph on a GPU (`CudaGraphStep`)."""
    n = len(tokens)
    if n != runner.rows:
        raise ValueError(f"{n} tokens for {runner.rows} rows")
    lengths = runner.lengths
    end = max(lengths) + 1
    runner.reserve(n, end)
    if w.one_call(n):
        logits = w.step_kernel(tokens, w.rope(end), runner.cache, lengths)
    elif w.attend_kernel:
        table, positions = w.rope(end), torch.tensor(lengths, dtype=torch.int32)
        x = w.embed(torch.tensor(tokens, device=w.device)).to(w.act_dtype)  # [rows, hidden]
        for i, (norm1, qkv, out, norm2, gate_up, down) in enumerate(w.layers):
            cache = runner.cache[i, :, :n]
            attn = kernel.attend(
                qkv(x, norm=norm1), table, cache[0], cache[1], positions, w.heads, w.kv_heads
            )
            out(attn, into=x)
            down(gate_up(x, norm=norm2), gated=True, into=x)
        logits = w.head(x, norm=w.norm).float()
    elif w.device.type == "cuda":
        logits = runner.graphed_step(tokens, lengths)
    else:
        inputs = torch.tensor([tokens, lengths], device=w.device)
        logits = step_in_pytorch(w, runner.cache, inputs[0], inputs[1], w.rope(runner.capacity))
    runner.lengths = [length + 1 for length in lengths]
    return logits


def step_in_pytorch(
    w: LlamaWeights, cache: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """`decode`'s step in PyTorch's operations, for the cache's first `len(tokens)` rows, with every input
    a tensor on the model's device (so that a CUDA graph can replay it for other tokens and positions):
    each row attends over the whole cache with the positions past its own masked. PyTorch's fused
    attention runs with the query heads that share a KV head as that head's query rows (one grouped
    call, several times faster than its general GQA path)."""
    n, heads, kv_heads, dim = tokens.shape[0], w.heads, w.kv_heads, w.head_dim
    group, rotated = heads // kv_heads, (heads + kv_heads) * dim
    size = cache.shape[4]
    past = torch.arange(size, device=w.device) > positions[:, None]  # positions past each row's new token
    mask = torch.zeros(n, 1, 1, size, dtype=w.dtype, device=w.device).masked_fill_(
        past[:, None, None], -torch.inf
    )
    fused = step_gpu.runs_on(w.device)  # rotary and cache writes in one kernel
    if not fused:
        cos, sin = table[:, positions, None]  # [rows, 1, head_dim] each
        rows = torch.arange(n, device=w.device)
    x = w.embed(tokens).to(w.act_dtype)  # [rows, hidden]
    for i, (norm1, qkv, out, norm2, gate_up, down) in enumerate(w.layers):
        mixed = qkv(x, norm=norm1)
        keys, values = cache[i, 0, :n], cache[i, 1, :n]  # [rows, kv_heads, positions, head_dim]
        if fused:
            q = step_gpu.rotate_store(mixed, table, positions, keys, values, heads, kv_heads)
        else:
            qk = rotate(mixed[:, :rotated].view(n, heads + kv_heads, dim), cos, sin).to(w.dtype)  # cache's
            keys[rows, :, positions] = qk[:, heads:]
            values[rows, :, positions] = mixed[:, rotated:].view(n, kv_heads, dim).to(w.dtype)
            q = qk[:, :heads]
        q = q.view(n, kv_heads, group, dim)
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out(attn.reshape(n, heads * dim).to(w.act_dtype), into=x)
        down(gate_up(x, norm=norm2), gated=True, into=x)
    return w.head(x, norm=w.norm).float()


class CudaGraphStep:
    """`step_in_pytorch` for one cache and number of rows on a CUDA GPU, recorded once as a CUDA graph
    and replayed for each token with new tokens and positions. A step of a 13B model is ~800 small
    kernels; launched from Python one at a time, their launches take longer than the GPU takes to read
    the weights. The first step runs as usual (it also warms up cuBLAS and tunes Triton's kernels), then
    is recorded; a runner records again when its cache or rows change."""

    def __init__(self, w: LlamaWeights, cache: torch.Tensor, rows: int) -> None:
        self.w, self.cache, self.rows = w, cache, rows  # the graph reads the cache and table: kept alive
        self.table = w.rope(cache.shape[4])
        self.host = torch.zeros(2, rows, dtype=torch.long, pin_memory=True)
        self.inputs = torch.zeros(2, rows, dtype=torch.long, device=w.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits = torch.empty(0)

    def __call__(self, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        host = self.host.numpy()
        host[0], host[1] = tokens, positions
        self.inputs.copy_(self.host, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            return self.logits.clone()  # the next replay overwrites them
        args = (self.w, self.cache, self.inputs[0], self.inputs[1], self.table)
        logits = step_in_pytorch(*args)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run: the cache is written once
            self.logits = step_in_pytorch(*args)
        return logits
