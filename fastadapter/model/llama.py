"""``LlamaModel``: a small, readable LLaMA 1/2/3 (RMSNorm, RoPE, SwiGLU, GQA) whose attention is
:func:`fastadapter.zero_init_attention`. Its linear layers are :class:`~fastadapter.linear.Linear`
(``nn.Linear`` whose CPU calls take the product measured fastest: a decode kernel, oneDNN or ``F.linear``).

Parameter names follow Meta's checkpoints (``tok_embeddings``, ``layers.{i}.attention.wq``, ``feed_forward.w1``,
``attention_norm``, ``ffn_norm``, ``norm``, ``output``), so a Meta state dict loads as it is. A layer becomes an
adapted layer when :func:`fastadapter.add_adapter` gives its attention a :class:`LayerAdapter`; the other layers
run plain causal attention (an empty prefix).

LLaMA's relatives (Qwen3, Gemma2/3, Olmo, SmolLM3, see :mod:`fastadapter.loaders.load_hf`) run on the same modules through a few
:class:`LlamaConfig` options: q/k norms, qkv clamp, head width, softmax scale, Gemma's norms and
:class:`SandwichNormBlock`, GeGLU, embedding scale, final logit soft-capping, per-layer RoPE. Each is off by
default and adds no tensor operation when off.

Three ways to call the model:

* batched: ``tokens [B, S]``;
* packed: ``tokens [1, T]`` with ``cu_seqlens`` — N sequences back to back, each attending only to itself, RoPE
  positions restarting at each sequence (zero_init_attention's varlen mode);
* with a :class:`KVCache` (generation): a packed prefill of the prompts into empty rows, then decoding steps
  ``tokens [B, s]`` appended at each row's own length.

Each layer makes one attention call per model call whatever the rows' lengths: the packed prefill runs the op's
varlen mode, and a step with a cache reads the padded cache of the whole batch, each row up to its own length
(``seqused_k``).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import zero_init_attention, zero_init_attention_varlen
from ..linear import Linear, linear
from .config import LlamaConfig
from .gated_activation import gated_activation
from .kv_cache import CacheStep, KVCache
from .layer_adapter import LayerAdapter
from .norms import ParameterFreeLayerNorm, PlusOneRMSNorm, RMSNorm, add_and_normalize
from .rope import apply_rope, rope_angles, rope_attention_factor, rope_inverse_frequencies


def make_norm(config: LlamaConfig, dim: int) -> nn.Module:
    """The norm layer ``config.norm`` names, over the last ``dim`` features."""
    if config.norm == "rmsnorm_plus_one":
        return PlusOneRMSNorm(dim, config.norm_eps)
    if config.norm == "layernorm_no_params":
        return ParameterFreeLayerNorm(dim, config.norm_eps)
    return RMSNorm(dim, config.norm_eps)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) · w3 x)`` (GeGLU, ``gelu_tanh`` for ``silu``, with ``mlp_activation="gelu_tanh"``)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu"):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)
        self.w3 = Linear(dim, hidden_dim, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(gated_activation(self.w1(x), self.w3(x), self.activation))


class Attention(nn.Module):
    """Grouped-query attention with RoPE, through zero-init attention; ``adapter`` (None until
    :func:`fastadapter.add_adapter`) supplies the prefix and the gate.

    With ``config.clip_qkv`` q, k, v are clamped after their projections, with ``config.qk_norm`` q and k go
    through ``q_norm``/``k_norm`` before RoPE; the prompt's keys and values take the same key and value path
    (clamp, ``k_norm``; no RoPE), as in :mod:`fastadapter.integrations._llama_pattern`."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = Linear(config.dim, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.wk = Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.wv = Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.wo = Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.adapter: Optional[LayerAdapter] = None
        self.clip_qkv = config.clip_qkv
        self.softmax_scale = config.attention_scale  # None: 1/sqrt(head_dim)
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else None

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-self.clip_qkv, self.clip_qkv)

    def _prefix_and_gate(self, x: torch.Tensor, cache: Optional[KVCache],
                         prompt_offset: Optional[torch.Tensor] = None):
        """``prefix_k, prefix_v [1, P, Hkv, D]`` (``[N, P, Hkv, D]`` with a per-sequence ``prompt_offset
        [N, P or 1, dim]``), the raw gate and its activation (P = 0 when not adapted)."""
        if self.adapter is None:
            if prompt_offset is not None:
                raise ValueError(f"prompt_offsets name layer {self.layer_index}, which has no adapter")
            empty = x.new_zeros(1, 0, self.n_kv_heads, self.head_dim)
            return empty, empty, x.new_zeros(1, dtype=torch.float32), "tanh"

        def project():
            per_sequence = {} if prompt_offset is None else {"offset": prompt_offset}
            prefix_k, prefix_v = self.adapter.prefix_kv(self.wk, self.wv, self.n_kv_heads, self.head_dim, x.dtype,
                                                        **per_sequence)
            if self.clip_qkv is not None:
                prefix_k, prefix_v = self._clip(prefix_k), self._clip(prefix_v)
            if self.k_norm is not None:
                prefix_k = self.k_norm(prefix_k)
            return prefix_k, prefix_v

        prefix_k, prefix_v = project() if cache is None else cache.prefix_kv(self.layer_index, project)
        return prefix_k, prefix_v, self.adapter.gate, self.adapter.gate_activation

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                cache: Optional[KVCache] = None, cache_step: Optional[CacheStep] = None,
                prompt_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [B, S, dim]`` (packed: ``[1, T, dim]``), ``cos, sin [B or 1, S, D/2]`` → ``[B, S, dim]``.

        With ``cache``, ``cache_step`` (from :meth:`KVCache.plan_packed` or :meth:`KVCache.plan_append`, made once
        per model call) says where this call's keys and values go; the attention then reads them back with the
        rows' past in one call. ``prompt_offset [N, P or 1, dim]``: added to this layer's prompt for each of the N
        sequences (rows, or packed sequences), giving the fused op one prompt per sequence.
        """
        batch, seqlen, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        prefix_k, prefix_v, gate, activation = self._prefix_and_gate(x, cache, prompt_offset)

        options = dict(causal=True, softmax_scale=self.softmax_scale, gate_activation=activation)

        if cache is not None and cache_step is None:
            raise ValueError("a call with a KV cache needs its cache_step (KVCache.plan_packed / plan_append)")
        if cu_seqlens is not None:
            # Prefill (or training): N sequences packed, each attending to itself.
            out = zero_init_attention_varlen(q[0], k[0], v[0], prefix_k, prefix_v, gate, cu_seqlens, cu_seqlens,
                                             max_seqlen, max_seqlen, **options)[None]
            if cache is not None:
                cache.write(self.layer_index, cache_step, k[0], v[0])
        elif cache is not None:
            # A step over the padded cache: every row's past plus its new tokens, each row up to its own length.
            cache.write(self.layer_index, cache_step, k.reshape(batch * seqlen, self.n_kv_heads, self.head_dim),
                        v.reshape(batch * seqlen, self.n_kv_heads, self.head_dim))
            keys, values = cache.read(self.layer_index, cache_step)
            out = zero_init_attention(q, keys, values, prefix_k, prefix_v, gate, seqused_k=cache_step.seqused_k,
                                      **options)
        else:
            out = zero_init_attention(q, k, v, prefix_k, prefix_v, gate, **options)
        return self.wo(out.reshape(batch, seqlen, self.n_heads * self.head_dim))

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``q [B, S, Hq, D]`` and ``k [B, S, Hkv, D]`` rotated, ``v [B, S, Hkv, D]``: the projections of
        ``x [B, S, dim]``, with ``clip_qkv``'s clamp after them (Olmo) and ``q_norm``/``k_norm`` before RoPE
        (Qwen3, Gemma3) when the config has them (LLaMA: projections, views and RoPE only)."""
        batch, seqlen, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.clip_qkv is not None:
            q, k, v = self._clip(q), self._clip(k), self._clip(v)
        q = q.view(batch, seqlen, self.n_heads, self.head_dim)
        k = k.view(batch, seqlen, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.view(batch, seqlen, self.n_kv_heads, self.head_dim)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attention(norm(x))``, ``out = h + feed_forward(norm(h))``."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.attention_norm = make_norm(config, config.dim)
        self.attention = Attention(config, layer_index)
        self.ffn_norm = make_norm(config, config.dim)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim, config.mlp_activation)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **attention_kwargs) -> torch.Tensor:
        h, normed = add_and_normalize(x, self.attention(self.attention_norm(x), cos, sin, **attention_kwargs),
                                      self.ffn_norm)
        return h + self.feed_forward(normed)


class SandwichNormBlock(TransformerBlock):
    """Gemma2/3's block (``config.sandwich_norms``): the outputs of the attention and of the feed-forward are
    normalised too before each residual addition, ``h = x + attention_output_norm(attention(attention_norm(x)))``,
    ``out = h + ffn_output_norm(feed_forward(ffn_norm(h)))``."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__(config, layer_index)
        self.attention_output_norm = make_norm(config, config.dim)
        self.ffn_output_norm = make_norm(config, config.dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **attention_kwargs) -> torch.Tensor:
        h = x + self.attention_output_norm(self.attention(self.attention_norm(x), cos, sin, **attention_kwargs))
        return h + self.ffn_output_norm(self.feed_forward(self.ffn_norm(h)))


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[T]`` int64 positions restarting at 0 at each packed sequence's start (``cu_seqlens`` int32 [N+1])."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    return torch.arange(total, device=cu_seqlens.device) - torch.repeat_interleave(starts, lengths, output_size=total)


class LlamaModel(nn.Module):
    """A LLaMA 1/2/3 decoder. Build it on the meta device (``with torch.device("meta"):``) to load weights
    without allocating twice, or on the CPU for a randomly initialised model.

    Args:
        config: the model's dimensions.
        activation_checkpointing: recompute, in backward, the activations of every block that takes part in
            the gradient (trades compute for memory when fine-tuning long sequences).
    """

    def __init__(self, config: LlamaConfig, *, activation_checkpointing: bool = False):
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        # Allocated without nn.Embedding's initialisation, which on the meta device goes through torch's reference
        # ops and imports torch._dynamo (a second and ~150 MB per process) for nothing: a real device gets the
        # same N(0, 1) initialisation right after.
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim,
                                           _weight=torch.empty(config.vocab_size, config.dim))
        if not self.tok_embeddings.weight.is_meta:
            nn.init.normal_(self.tok_embeddings.weight)
        block = SandwichNormBlock if config.sandwich_norms else TransformerBlock
        self.layers = nn.ModuleList(block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config, config.dim)
        # Tied: no separate parameter, the logits reuse the embedding (one tensor in the state dict).
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        #: The AdapterConfig of the adapter that fastadapter.add_adapter gave the model (None: not adapted).
        self.adapter_config = None
        #: Where fastadapter.load_adapter read the adapter from, and its gate activation with the reason (None when
        #: the adapter was not loaded from a file).
        self.adapter_source = None

    @property
    def output_weight(self) -> torch.Tensor:
        """``[V, dim]``: the output layer's weight (the token embedding when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(self, tokens: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None, positions: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None,
                logits_positions: Optional[torch.Tensor] = None,
                prompt_offsets: Optional[Mapping[int, torch.Tensor]] = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits of every position (or of ``logits_positions``).

        Args:
            tokens: int64 ``[B, S]``; with ``cu_seqlens``, ``[1, T]`` holding N sequences back to back.
            cu_seqlens: int32 ``[N+1]`` sequence starts in the packed ``tokens`` (``cu_seqlens[-1] == T``).
            max_seqlen: the longest packed sequence (computed from ``cu_seqlens`` when None).
            positions: int64 RoPE positions ``[B, S]`` or ``[S]``; default ``0..S-1`` (batched), restarting at
                each sequence (packed), or continuing each row's cached length (with ``cache``).
            cache: a :class:`KVCache` for generation: a packed call fills its empty rows (row n ← sequence n), a
                batched call appends ``S`` tokens to every row.
            logits_positions: int64 ``[K]``: compute the logits only at these positions of the sequence axis
                (the training loss needs them only at response tokens; the output head and its ``[T, V]``
                logits are often a step's largest cost in memory).
            prompt_offsets: ``{layer index: [N, P or 1, dim]}``, one prompt per sequence (multimodal
                LLaMA-Adapter, :mod:`fastadapter.vision`): layer ``i``'s adaption prompt becomes
                ``prompt + prompt_offsets[i][n]`` for sequence ``n`` (the N rows of ``tokens``, or its N packed
                sequences); a zero row is the plain prompt. Layers not named keep the shared prompt. With a
                ``cache``, give them at the prefill: the per-sequence prefix K/V are kept for the decoding steps.
            return_hidden: return the final-normed hidden states ``[B, S or K, dim]`` instead of the logits (the
                head ``output_weight`` and ``config.final_logit_softcap`` turn them into logits; the training loss
                fuses the two: :mod:`fastadapter.training.linear_cross_entropy`).

        Returns:
            ``[B, S, V]`` logits in the model's dtype (``[B, K, V]`` with ``logits_positions``).
        """
        tokens, positions, cu_seqlens, max_seqlen, step = self._check_call(tokens, cu_seqlens, max_seqlen,
                                                                           positions, cache)
        rotations = self._layer_rotations(positions)
        h = self.tok_embeddings(tokens)
        if self.config.scale_embeddings:
            h = h * torch.tensor(self.config.dim ** 0.5).to(h.dtype)  # rounded to h's dtype as Gemma's
        kwargs = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, cache=cache, cache_step=step)
        offsets = self._check_prompt_offsets(prompt_offsets, tokens, cu_seqlens)
        for index, block in enumerate(self.layers):
            cos, sin = rotations[index]
            kwargs["prompt_offset"] = offsets.get(index)
            if self.activation_checkpointing and self._takes_part_in_gradient(block, h, kwargs["prompt_offset"]):
                h = checkpoint(block, h, cos, sin, use_reentrant=False, **kwargs)
            else:
                h = block(h, cos, sin, **kwargs)
        if cache is not None:
            cache.advance(step.new_lengths)
        if logits_positions is not None:
            h = h.index_select(1, logits_positions)
        h = self.norm(h)
        if return_hidden:
            return h
        logits = linear(h, self.output_weight)
        if self.config.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.config.final_logit_softcap) * self.config.final_logit_softcap
        return logits

    def _layer_rotations(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(cos, sin)`` of each layer, ``[B or 1, S, D/2]`` each: one pair shared by every layer, unless
        ``config.local_rope_layers`` rotate with their own base (Gemma3) or ``config.layers_without_rope`` do not
        rotate (SmolLM3: angle 0, ``cos = 1``, ``sin = 0``, which leaves q and k exactly as they are)."""
        c = self.config
        inv_freq = rope_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling, device=positions.device)
        cos, sin = rope_angles(positions, inv_freq)
        factor = rope_attention_factor(c.rope_scaling)
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
        rotations = [(cos, sin)] * c.n_layers
        if c.local_rope_layers:
            local = rope_angles(positions, rope_inverse_frequencies(c.head_dim, c.local_rope_theta,
                                                                    device=positions.device))
            for i in c.local_rope_layers:
                rotations[i] = local
        if c.layers_without_rope:
            identity = (torch.ones_like(cos), torch.zeros_like(sin))
            for i in c.layers_without_rope:
                rotations[i] = identity
        return rotations

    @staticmethod
    def _takes_part_in_gradient(block: nn.Module, h: torch.Tensor, offset: Optional[torch.Tensor] = None) -> bool:
        # A frozen block on inputs that need no gradient records no graph: recomputing it would be wasted work.
        return torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in block.parameters())
                                            or (offset is not None and offset.requires_grad))

    def _check_prompt_offsets(self, prompt_offsets, tokens: torch.Tensor, cu_seqlens) -> dict:
        """``prompt_offsets`` checked against the call: adapted layers, N sequences, ``[N, P or 1, dim]``."""
        if not prompt_offsets:
            return {}
        sequences = tokens.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        checked = {}
        for layer, offset in prompt_offsets.items():
            if not isinstance(layer, int) or not 0 <= layer < self.config.n_layers:
                raise ValueError(f"prompt_offsets keys must be layer indices in [0, {self.config.n_layers}), "
                                 f"got {layer!r}")
            adapter = self.layers[layer].attention.adapter
            if adapter is None:
                raise ValueError(f"prompt_offsets name layer {layer}, which has no adapter (add_adapter first)")
            if (not isinstance(offset, torch.Tensor) or offset.dim() != 3 or offset.shape[0] != sequences
                    or offset.shape[1] not in (1, adapter.prompt_len) or offset.shape[2] != self.config.dim):
                raise ValueError(f"prompt_offsets[{layer}] must have shape [{sequences}, {adapter.prompt_len} or 1, "
                                 f"{self.config.dim}] (sequences, prompt tokens, dim), got "
                                 f"{tuple(getattr(offset, 'shape', ()))}")
            checked[layer] = offset
        return checked

    def _check_call(self, tokens, cu_seqlens, max_seqlen, positions, cache):
        """Validate the arguments of :meth:`forward`; return tokens, positions, the varlen arguments and the
        :class:`CacheStep` of a call with a cache (None without)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an integer tensor [B, S], got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape [B, S], got {tuple(tokens.shape)}")
        vocab = self.config.vocab_size
        # Checked on the CPU only: on an accelerator the check would cost a synchronisation per call, and the
        # embedding's own bounds check fires there anyway.
        if tokens.device.type == "cpu" and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}), got ids from {int(tokens.min())} to "
                             f"{int(tokens.max())}")
        batch, seqlen = tokens.shape
        step, longest = None, seqlen  # longest: the most keys one query attends to (its sequence so far)
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError(f"packed tokens (with cu_seqlens) must have shape [1, T], got {tuple(tokens.shape)}")
            if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
                raise ValueError(f"cu_seqlens must be int32 [N+1], got {cu_seqlens.dtype} "
                                 f"{tuple(cu_seqlens.shape)}")
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != seqlen:
                raise ValueError(f"cu_seqlens must run from 0 to the number of packed tokens {seqlen}, got "
                                 f"{cu_seqlens.tolist()}")
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            if int(lengths.min()) <= 0:
                raise ValueError(f"cu_seqlens must be strictly increasing, got {cu_seqlens.tolist()}")
            if max_seqlen is None:
                max_seqlen = int(lengths.max())
            if positions is None:
                positions = positions_from_cu_seqlens(cu_seqlens, seqlen)[None]
            step = None if cache is None else cache.plan_packed(lengths.tolist())
            longest = int(lengths.max())
        elif max_seqlen is not None:
            raise ValueError("max_seqlen is only meaningful with cu_seqlens")
        elif cache is not None:
            if cache.batch != batch:
                raise ValueError(f"the KV cache has {cache.batch} rows, tokens have {batch}")
            longest = max(int(n) for n in cache.lengths) + seqlen
            step = cache.plan_append(seqlen)
            if positions is None:
                offsets = torch.tensor(cache.lengths, device=tokens.device)[:, None]
                positions = offsets + torch.arange(seqlen, device=tokens.device)
        if positions is None:
            positions = torch.arange(seqlen, device=tokens.device)[None]
        if positions.dim() == 1:
            positions = positions[None]
        if positions.shape[-1] != seqlen or positions.shape[0] not in (1, batch):
            raise ValueError(f"positions must have shape [{seqlen}] or [{batch}, {seqlen}], got "
                             f"{tuple(positions.shape)}")
        window = self.config.sliding_window
        if window is not None and longest > window:
            # Full causal attention equals the sliding window only while a sequence fits in the window.
            raise ValueError(f"a sequence of {longest} tokens is longer than the model's sliding attention window "
                             f"({window} tokens): this model computes full causal attention, exact only within "
                             f"the window; split the input into sequences of at most {window} tokens")
        return tokens, positions, cu_seqlens, max_seqlen, step
