"""What every GEMM kernel of vitfast applies to its fp32 tiles: the activations and their derivatives,
the dropout keep mask of a GEMM's output, and the grouped order in which programs walk output tiles
(``linear``'s pointer and descriptor kernels and ``gated_linear`` share them)."""
import triton
import triton.language as tl

from ._random import GEMM, keep

_GEMM_SITE = tl.constexpr(GEMM)

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "quick_gelu", "relu", "silu")


@triton.jit
def _gelu_cdf(z):
    """Φ(z), the standard normal CDF: exact GELU is z·Φ(z)."""
    return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_tanh_gate(z):
    """sigmoid(2u) = 0.5·(1 + tanh(u)) with u = sqrt(2/π)·(z + 0.044715·z³): tanh GELU is z·gate."""
    # The floor keeps exp(-2u) finite; it moves the result by less than 1e-33.
    return tl.sigmoid(tl.maximum(1.5957691216057308 * (z + 0.044715 * z * z * z), -80.0))


@triton.jit
def _quick_gelu_gate(z):
    """sigmoid(1.702·z): QuickGELU (OpenAI CLIP's activation) is z·gate."""
    # The floor keeps exp(-1.702·z) finite (it overflows fp32 below z ≈ -52); it moves the result
    # by less than 1e-33.
    return tl.sigmoid(tl.maximum(1.702 * z, -80.0))


@triton.jit
def _silu_gate(z):
    """sigmoid(z): SiLU (swish, the gate of SwiGLU) is z·gate."""
    # The floor keeps exp(-z) finite (it overflows fp32 below z ≈ -88); it moves the result by less
    # than 1e-33.
    return tl.sigmoid(tl.maximum(z, -80.0))


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    """act(z) on an fp32 tile."""
    if ACTIVATION == "gelu":
        z = z * _gelu_cdf(z)
    elif ACTIVATION == "gelu_tanh":
        z = z * _gelu_tanh_gate(z)
    elif ACTIVATION == "quick_gelu":
        z = z * _quick_gelu_gate(z)
    elif ACTIVATION == "relu":
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == "silu":
        z = z * _silu_gate(z)
    return z


@triton.jit
def _activate_bwd(g, z, ACTIVATION: tl.constexpr):
    """g ⊙ act'(z) on fp32 tiles: the gradient through act, given g, the gradient of act(z)."""
    if ACTIVATION == "gelu":
        # d/dz z·Φ(z) = Φ(z) + z·φ(z)
        g *= _gelu_cdf(z) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACTIVATION == "gelu_tanh":
        # d/dz z·s = s + z·ds/dz,
        # ds/dz = 2·s·(1 - s)·du/dz = s·(1 - s)·2·sqrt(2/π)·(1 + 3·0.044715·z²).
        gate = _gelu_tanh_gate(z)
        g *= gate + z * gate * (1.0 - gate) * 1.5957691216057308 * (1.0 + 0.134145 * z * z)
    elif ACTIVATION == "quick_gelu":
        # d/dz z·s = s + z·ds/dz, ds/dz = 1.702·s·(1 - s).
        gate = _quick_gelu_gate(z)
        g *= gate + 1.702 * z * gate * (1.0 - gate)
    elif ACTIVATION == "relu":
        g = tl.where(z > 0.0, g, 0.0)
    elif ACTIVATION == "silu":
        # d/dz z·s = s + z·s·(1 - s).
        gate = _silu_gate(z)
        g *= gate + z * gate * (1.0 - gate)
    return g


@triton.jit
def gemm_keep(SEED, rows, cols, p):
    """True where output element (rows, cols) of a GEMM survives dropout with probability p: the
    coordinates ``kernels/_random.py`` fixes for the GEMM site (column, row's low 32 bits, row >> 32),
    so every kernel that applies or differentiates the mask, and ``keep_mask``, agree."""
    rows64 = rows.to(tl.int64)
    return keep(tl.load(SEED), cols.to(tl.int32), (rows64 & 0xFFFFFFFF).to(tl.int32), (rows64 >> 32).to(tl.int32),
                _GEMM_SITE, p)


@triton.jit
def _tile_position(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` over an M × N output: programs walk the tiles in
    groups of GROUP_M row-tiles so that consecutive programs share W's column tiles and X's row tiles
    in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group_start = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - group_start, GROUP_M)
    within = pid % per_group
    return group_start + within % group_rows, within // group_rows


@triton.jit
def branch(acc, rows, cols, M, N, S, stride_s, SEED, ROW_SCALE, dropout_p, keep_scale, ACTIVATION: tl.constexpr,
           DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr):
    """r ⊙ s ⊙ dropout(act(z)) of an fp32 tile z = ``acc`` at output ``rows`` × ``cols`` (vectors):
    what every GEMM epilogue applies between the bias and the residual. S: [N] column scale of any
    float dtype (stride ``stride_s``); ROW_SCALE: contiguous fp32 [M]; dropout keeps an element with
    probability 1 - ``dropout_p`` (``gemm_keep``) and multiplies it by ``keep_scale``."""
    acc = _activate(acc, ACTIVATION)
    if DROPOUT:  # where, not a multiply by 0: an infinite activation drops to 0, not NaN
        acc = tl.where(gemm_keep(SEED, rows[:, None], cols[None, :], dropout_p), acc * keep_scale, 0.0)
    if HAS_SCALE:
        acc *= tl.load(S + cols.to(tl.int64) * stride_s, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_ROW_SCALE:
        acc *= tl.load(ROW_SCALE + rows.to(tl.int64), mask=rows < M, other=0.0)[:, None]
    return acc
