"""Row-wise batch-invariant Triton kernels for the decoder step, with their exact PyTorch references.

Why: a decode step of a Llama-3-8B-shaped model is one CUDA graph whose GEMMs are near the HBM
floor, while ~1000 tiny elementwise kernels (RMSNorm in fp32 pieces, RoPE's cat/neg/mul/add,
SiLU*mul, residual adds) and a masked SDPA over the whole static cache cost as much again. These
kernels fuse each of those into one launch: add+RMSNorm, RoPE+KV-cache write, SiLU*mul, and a
flash-decoding cache attention (split kernel + combine kernel) that reads the committed length
from a device tensor, so it stays CUDA-graph safe.

Batch invariance is the contract (torch.compile broke it): every kernel computes a token row with
a launch configuration (block sizes, warps, split size, reduction order) that depends only on the
model shape, never on the number of rows T or on what the other rows hold. A row's bits are the
same in a T=1 decode step, inside the T=64 tree-verification step, and in a prefill chunk. In
the attention that means a fixed KV split size (``AttentionConfig``), key blocks aligned to
absolute slot numbers, and a combine that sums the splits in one fixed tile order; a split that is
fully masked for a row contributes exact zeros. It also means one compiled binary: the tree step and
the plain step must not launch different constexpr variants (or differently specialised integer
arguments) of a kernel, because two variants of one source may compile to different instruction
sequences. ``medusa-forge bench probe`` checks the result on a GPU: every committed KV-cache entry of
tree decoding against plain decoding, bit for bit.

The references are exactly the ops the decoder ran before these kernels, so the CPU path
(compared with transformers token for token) is bit-for-bit unchanged. The Triton kernels reproduce
the references' dtype rounding points (x*cos and rot*sin rounded before the add, SiLU rounded before
the multiply, the normalised row rounded before the weight), so they differ from them only by
reduction order. Dispatch (:func:`use_triton`) and the lazy jit are in ``_triton``.

One module per op family, each op's reference, Triton source and launcher together: ``norms``
(add+RMSNorm), ``rope`` (RoPE + KV-cache write), ``mlp`` (SiLU*mul), ``attention`` (cache attention
and its tile config), ``fp8`` (activation quantization), ``medusa_step`` (argmax/top-k, heads'
residual blocks, tree inputs, greedy commit, KV move). ``from medusa_forge import kernels`` then
``kernels.rms_norm(...)``: this package re-exports every op.
"""

from __future__ import annotations

from medusa_forge.kernels._triton import (
    HAVE_TRITON,
    _kernel,
    reference_kernels,
    use_triton,
)
from medusa_forge.kernels.attention import (
    ATTENTION_BY_SHAPE,
    DEFAULT_ATTENTION,
    LOG2E,
    AttentionConfig,
    ancestor_table,
    attention_config,
    cache_attention,
    cache_attention_ref,
    cache_attention_triton,
    cache_mask,
    causal_ancestors,
    masked_attention,
)
from medusa_forge.kernels.fp8 import (
    quantize_fp8_triton,
)
from medusa_forge.kernels.medusa_step import (
    ROW_CHUNK,
    TOPK_MIN_CHUNK,
    greedy_commit_triton,
    heads_resblocks_triton,
    move_kv_triton,
    plain_commit,
    row_argmax,
    row_argmax_triton,
    topk_indices,
    topk_indices_triton,
    tree_inputs,
    tree_inputs_triton,
)
from medusa_forge.kernels.mlp import (
    silu_mul,
    silu_mul_fp8_triton,
    silu_mul_ref,
    silu_mul_triton,
)
from medusa_forge.kernels.norms import (
    add_rms_norm,
    add_rms_norm_ref,
    add_rms_norm_triton,
    rms_norm,
    rms_norm_fp8_triton,
    rms_norm_ref,
    rms_norm_triton,
)
from medusa_forge.kernels.rope import (
    apply_rope,
    rope_qkv_to_cache,
    rope_qkv_to_cache_ref,
    rope_qkv_to_cache_triton,
)

__all__ = [
    "ATTENTION_BY_SHAPE",
    "DEFAULT_ATTENTION",
    "HAVE_TRITON",
    "LOG2E",
    "ROW_CHUNK",
    "TOPK_MIN_CHUNK",
    "AttentionConfig",
    "_kernel",
    "add_rms_norm",
    "add_rms_norm_ref",
    "add_rms_norm_triton",
    "ancestor_table",
    "apply_rope",
    "attention_config",
    "cache_attention",
    "cache_attention_ref",
    "cache_attention_triton",
    "cache_mask",
    "causal_ancestors",
    "greedy_commit_triton",
    "heads_resblocks_triton",
    "masked_attention",
    "move_kv_triton",
    "plain_commit",
    "quantize_fp8_triton",
    "reference_kernels",
    "rms_norm",
    "rms_norm_fp8_triton",
    "rms_norm_ref",
    "rms_norm_triton",
    "rope_qkv_to_cache",
    "rope_qkv_to_cache_ref",
    "rope_qkv_to_cache_triton",
    "row_argmax",
    "row_argmax_triton",
    "silu_mul",
    "silu_mul_fp8_triton",
    "silu_mul_ref",
    "silu_mul_triton",
    "topk_indices",
    "topk_indices_triton",
    "tree_inputs",
    "tree_inputs_triton",
    "use_triton",
]
