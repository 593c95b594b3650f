"""The Llama-family decoder (Llama, Llama-3.1, Mistral, Qwen2, Qwen3, SmolLM2) over the paged KV cache.

One class covers the family; the differences are read from the Hugging Face config:
- q/k/v bias (Qwen2 always, Llama/Qwen3 when `attention_bias`), o_proj bias (`attention_bias`,
  not Qwen2), MLP bias (`mlp_bias`);
- per-head RMSNorm of q and k before rotary (Qwen3), and `head_dim` that need not be hidden/heads;
- rotary scaling (`rope_scaling` / `rope_parameters`, e.g. Llama-3.1's `llama3`);
- tied or untied input and output embeddings.

q, k and v share one Linear, as do gate and up: one matmul each instead of three and two. The
Hugging Face weights are concatenated into them at load time.

Under tensor parallelism (`engine.parallel`) each rank builds the same class with its share of the
heads, the MLP and the vocabulary, reads only its slices of each weight, and joins the others'
partial results with an all-reduce after o_proj, after down_proj and after the embedding lookup,
and a gather of the LM head's columns on rank 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.parallel import TPGroup
from kernels import (
    AttnMetadata,
    apply_rotary,
    fused_add_rms_norm,
    paged_attention,
    rms_norm,
    rotary_cos_sin,
    silu_and_mul,
    write_kv,
)


def _rope(config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from a transformers 4.x or 5.x config."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or params or None
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None and scaling:
        theta = scaling.get("rope_theta")
    return float(theta if theta is not None else 10000.0), scaling


class _Layer(nn.Module):
    """One decoder layer: attention over the paged cache, then the gated MLP."""

    def __init__(self, config: Any, head_dim: int, tp: TPGroup) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.tp = tp
        total_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.num_heads = config.num_attention_heads // tp.size
        self.num_kv_heads = tp.kv_heads(total_kv_heads)[1]
        intermediate = config.intermediate_size // tp.size
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        self.eps = config.rms_norm_eps
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = attention_bias or config.model_type == "qwen2"
        mlp_bias = bool(getattr(config, "mlp_bias", False))

        self.input_layernorm = nn.Parameter(torch.empty(hidden))
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=attention_bias and config.model_type != "qwen2")
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = nn.Parameter(torch.empty(head_dim))
            self.k_norm = nn.Parameter(torch.empty(head_dim))
        self.post_attention_layernorm = nn.Parameter(torch.empty(hidden))
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=mlp_bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=mlp_bias)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttnMetadata,
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = rms_norm(hidden, self.input_layernorm, self.eps)
        else:
            hidden, residual = fused_add_rms_norm(hidden, residual, self.input_layernorm, self.eps)

        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        q, k = apply_rotary(q, k, positions, cos_sin)
        k_cache, v_cache = kv_cache
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        attn = paged_attention(q, k_cache, v_cache, meta, self.scale)
        hidden = self._row_parallel(self.o_proj, attn.reshape(num_tokens, self.q_size))

        hidden, residual = fused_add_rms_norm(hidden, residual, self.post_attention_layernorm, self.eps)
        hidden = self._row_parallel(self.down_proj, silu_and_mul(self.gate_up_proj(hidden)))
        return hidden, residual

    def _row_parallel(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """A Linear whose input features are split over the ranks: the partial products are summed,
        then the (replicated) bias is added once."""
        if self.tp.size == 1:
            return linear(x)
        out = self.tp.all_reduce(F.linear(x, linear.weight))
        return out if linear.bias is None else out + linear.bias


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM whose attention reads and writes a paged KV cache.

    Built from a Hugging Face config (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config) with
    uninitialised parameters of `dtype` on `device`; `load_weights` fills them from Hugging Face
    named tensors (or the loader fills them with random values for dummy weights).
    """

    def __init__(self, config: Any, dtype: torch.dtype, device: torch.device | str,
                 tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp = tp or TPGroup()
        self.vocab_start, vocab_rows = tp.vocab(config.vocab_size)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        # Built on the meta device, then given real but uninitialised memory: nn.Linear's own random
        # init would cost seconds on a big model only to be overwritten by the weights.
        with torch.device("meta"):
            # Given its weight, Embedding skips its random init: on meta that init alone costs seconds
            # of one-time imports (torch's reference decompositions).
            self.embed_tokens = nn.Embedding(vocab_rows, config.hidden_size,
                                             _weight=torch.empty(vocab_rows, config.hidden_size))
            self.layers = nn.ModuleList(_Layer(config, self.head_dim, tp) for _ in range(config.num_hidden_layers))
            self.norm = nn.Parameter(torch.empty(config.hidden_size))
            self.lm_head = None
            if not self.tie_word_embeddings:
                self.lm_head = nn.Parameter(torch.empty(vocab_rows, config.hidden_size))
            self.to(dtype)  # still on meta: free, and no float32 copy is ever allocated
        # to_empty's empty_like on meta tensors imports sympy (seconds); plain empty does not.
        self._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
        self.requires_grad_(False)
        theta, scaling = _rope(config)
        # float32 whatever the model dtype: the rotary kernel casts per use, and the table stays exact
        self.cos_sin = rotary_cos_sin(self.head_dim, config.max_position_embeddings, theta, scaling, device=device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttnMetadata,
    ) -> torch.Tensor:
        """Runs one flat batch of tokens (of many sequences) and returns final hidden states [T, H].

        Each layer writes the batch's keys and values into `kv_caches[i]` at `meta.slot_mapping`
        before attending, so later steps see them.
        """
        hidden = self._embed(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, self.cos_sin)
        hidden, _ = fused_add_rms_norm(hidden, residual, self.norm, self.eps)
        return hidden

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.embed_tokens(input_ids)
        # Each rank looks up the ids in its rows and gives zeros for the rest; the sum is the lookup.
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.embed_tokens.num_embeddings)
        hidden = F.embedding(local.masked_fill(outside, 0), self.embed_tokens.weight)
        return self.tp.all_reduce(hidden.masked_fill_(outside.unsqueeze(-1), 0))

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None,
                       float32: bool = True) -> torch.Tensor:
        """Vocabulary logits [N, vocab] for the rows of `hidden` that need sampling: in float32, or
        as the matmul gives them (the model's dtype) with `float32=False` or when written into `out`
        ([N, vocab], the model's dtype).

        Under tensor parallelism every rank must call it with the same rows; rank 0 gets the logits,
        the others None."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head
        if self.tp.size > 1:
            logits = self.tp.gather_columns(F.linear(hidden, weight), self.config.vocab_size)
            return None if logits is None else logits.float() if float32 else logits
        if out is not None:
            return torch.mm(hidden, weight.t(), out=out)
        logits = F.linear(hidden, weight)
        return logits.float() if float32 else logits

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Copies Hugging Face named tensors into the parameters, one at a time.

        Each weight is a tensor or a lazy safetensors slice (`safe_open(...).get_slice`), from which
        only this rank's share is read: a tensor-parallel rank never holds a whole checkpoint.
        q/k/v and gate/up go into their slice of the fused Linear. Rotary inverse frequencies and a
        tied `lm_head.weight` are skipped. Every parameter must be covered; a missing or unknown
        name raises ValueError naming it.
        """
        params = dict(self.named_parameters())
        loaded: dict[str, set[int] | None] = {}  # fused param -> slices seen; None = whole param
        for hf_name, source in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            if hf_name == "lm_head.weight" and self.lm_head is None:
                continue
            name, part = self._param_for(hf_name)
            param = params.get(name)
            if param is None:
                raise ValueError(f"unexpected weight {hf_name!r} for {self.config.model_type} model")
            target = param.data if part is None else self._slice(name, param.data, part)
            full = tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)
            shard = self._shard_of(name, part, full)
            if shard is None:
                tensor = source[:]
            else:
                dim, start, length, expected = shard
                if full[dim] != expected:
                    raise ValueError(f"weight {hf_name!r} has shape {full}, expected {expected} along dim {dim}")
                index = (slice(None),) * dim + (slice(start, start + length),)
                tensor = source[index]
                if name in ("embed_tokens.weight", "lm_head"):  # the last rank's rows past the vocabulary
                    target[length:].zero_()
                    target = target[:length]
            if target.shape != tensor.shape:
                raise ValueError(f"weight {hf_name!r} has shape {full}, expected {tuple(target.shape)} "
                                 f"(this rank's share: {tuple(tensor.shape)})")
            target.copy_(tensor)
            if part is None:
                loaded[name] = None
            else:
                loaded.setdefault(name, set()).add(part)
        missing = [
            n for n in params
            if n not in loaded or (loaded[n] is not None and len(loaded[n]) != self._num_parts(n))
        ]
        if missing:
            raise ValueError(f"weights missing for {len(missing)} parameters, e.g. {missing[:5]}")

    def _shard_of(self, name: str, part: int | None,
                  full: tuple[int, ...]) -> tuple[int, int, int, int] | None:
        """(dim, start, length, full length) of this rank's share of a Hugging Face weight, or None
        for a weight every rank holds whole (norms, and the biases added after an all-reduce)."""
        tp, cfg, d = self.tp, self.config, self.head_dim
        layer = self.layers[0]
        if name in ("embed_tokens.weight", "lm_head"):
            start, rows = tp.vocab(cfg.vocab_size)
            return 0, start, max(0, min(rows, cfg.vocab_size - start)), cfg.vocab_size
        if ".qkv_proj." in name:
            if part == 0:
                return 0, tp.rank * layer.q_size, layer.q_size, layer.q_size * tp.size
            kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            first, _ = tp.kv_heads(kv_heads)
            return 0, first * d, layer.kv_size, kv_heads * d
        if ".gate_up_proj." in name:
            n = cfg.intermediate_size // tp.size
            return 0, tp.rank * n, n, cfg.intermediate_size
        if name.endswith("o_proj.weight"):
            return 1, tp.rank * layer.q_size, layer.q_size, layer.q_size * tp.size
        if name.endswith("down_proj.weight"):
            n = cfg.intermediate_size // tp.size
            return 1, tp.rank * n, n, cfg.intermediate_size
        return None

    # q, k, v -> parts 0, 1, 2 of qkv_proj; gate, up -> parts 0, 1 of gate_up_proj
    _FUSED = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    @classmethod
    def _param_for(cls, hf_name: str) -> tuple[str, int | None]:
        """Our parameter name for a Hugging Face one, and the fused part it fills (or None)."""
        name = hf_name.removeprefix("model.")
        name = name.replace("self_attn.", "").replace("mlp.", "")
        if name.endswith("norm.weight"):  # RMSNorm weights are plain Parameters here
            name = name[: -len(".weight")]
        elif name == "lm_head.weight":
            name = "lm_head"
        parts = name.split(".")
        for i, p in enumerate(parts):
            if p in cls._FUSED:
                fused, part = cls._FUSED[p]
                parts[i] = fused
                return ".".join(parts), part
        return name, None

    def _num_parts(self, name: str) -> int:
        return 3 if ".qkv_proj." in name else 2

    def _slice(self, name: str, data: torch.Tensor, part: int) -> torch.Tensor:
        if ".qkv_proj." in name:
            q_size, kv_size = self.layers[0].q_size, self.layers[0].kv_size
            sizes = [q_size, kv_size, kv_size]
        else:
            half = data.shape[0] // 2
            sizes = [half, half]
        start = sum(sizes[:part])
        return data.narrow(0, start, sizes[part])
