"""The cores: the only places where time is mixed.

Each core has a sequential reference (``*_ref``, a loop over time) and a fast chunked or
parallel form; both are differentiable, accumulate states in fp32 (complex64 for complex) and
return outputs in the input dtype, accept ``initial_state`` / ``output_final_state`` and packed
variable-length input via ``cu_seqlens``. Layout and conventions follow flash-linear-attention:
q/k ``[B, T, H, K]``, v ``[B, T, H, V]``, gates in log space, ``scale`` = ``K ** -0.5`` by default.

=====================  ===================================================================
``scan``               ``h_t = a_t ⊙ h_{t-1} + b_t`` (vector state, real or complex)
``linear``             ``S_t = exp(g_t) ⊙ S_{t-1} + k_t v_tᵀ``, decay none/[H]/[H,K]/[H,K,V]
``linear_complex``     complex per-key decay, lowered to ``linear`` on 2K dims + rotary
``delta``              ``S_t = exp(g_t)(I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``
``delta_interleave``   ``steps`` Householder sub-steps per token, lowered to ``delta``
``attention``          causal softmax attention: GQA, sliding window, RoPE, soft-cap
=====================  ===================================================================
"""

from .attention import apply_rope, attention, attention_decode, attention_ref
from .complex_decay import linear_complex, linear_complex_ref
from .delta import delta, delta_interleave, delta_ref
from .linear import linear, linear_ref
from .scan import associative_scan, blocked_scan, scan, scan_ref
from .tolerances import TOLERANCES, assert_close

__all__ = [
    "scan", "scan_ref", "associative_scan", "blocked_scan",
    "linear", "linear_ref", "linear_complex", "linear_complex_ref",
    "delta", "delta_ref", "delta_interleave",
    "attention", "attention_ref", "attention_decode", "apply_rope",
    "TOLERANCES", "assert_close",
]
