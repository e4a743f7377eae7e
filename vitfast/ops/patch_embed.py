"""``patch_embed``: Conv2d patch projection + bias + CLS token + position embedding, one launch."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import runtime
from . import _autocast as autocast
from ._dispatch import call, custom_op, kernel_path
from ._trace import fx_traceable
from ._validate import check_float, check_same_device, check_same_dtype, check_shape


@custom_op("vitfast::patch_embed_fwd", mutates_args=())
def _patch_embed_fwd(
    images: Tensor, weight: Tensor, bias: Optional[Tensor], cls_token: Optional[Tensor],
    cls_pos: Optional[Tensor], pos: Optional[Tensor], channels_first: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Tokens in ``out_dtype`` (default the images'; the public op passes the promoted dtype under
    autocast)."""
    from ..kernels.patch_embed import patch_embed_fwd

    B, _, H, W = images.shape
    D, P = weight.shape[0], weight.shape[-1]
    T = int(cls_token is not None) + (H // P) * (W // P)
    dtype = out_dtype or images.dtype
    # The kernel stores through the output's strides: channel-major is the same launch.
    out = (runtime.empty(B, D, T, dtype=dtype, device=images.device).transpose(1, 2) if channels_first
           else runtime.empty(B, T, D, dtype=dtype, device=images.device))
    with runtime.launching(images.device, images.dtype):
        patch_embed_fwd(images, weight, bias, cls_token, cls_pos, pos, out)
    return out


@_patch_embed_fwd.register_fake
def _(images, weight, bias, cls_token, cls_pos, pos, channels_first=False, out_dtype=None):
    B, _, H, W = images.shape
    D, P = weight.shape[0], weight.shape[-1]
    T = int(cls_token is not None) + (H // P) * (W // P)
    dtype = out_dtype or images.dtype
    return (images.new_empty(B, D, T, dtype=dtype).transpose(1, 2) if channels_first
            else images.new_empty(B, T, D, dtype=dtype))


# conv2d's operands cast, as autocast casts them; the tokens promoted with the class token and positions.
autocast.register("patch_embed_fwd", cast_args=(0, 1, 2), result=(7, (3, 4, 5)))


def _setup_context(ctx, inputs, output) -> None:
    images, weight, bias, cls_token, cls_pos, pos, *_ = inputs
    ctx.save_for_backward(images, weight)
    ctx.prefix = int(cls_token is not None)
    ctx.dtypes = [None if t is None else t.dtype for t in (bias, cls_token, cls_pos, pos)]


def _backward(ctx, dtokens: Tensor):
    """Both GEMMs (images, weight) on the kernel; the small reductions over dtokens in torch: one
    fp32 pass summing over the batch gives dpos, the class rows, and dbias as their sum over patches."""
    images, weight = ctx.saved_tensors
    need_images, need_weight, *need_rest = ctx.needs_input_grad
    dimages = dweight = None
    if need_images or need_weight:
        # Wider tokens (fp32 under autocast): their gradient meets the GEMMs rounded once, as eager's
        # reaches its half-precision convolution.
        dimages, dweight = torch.ops.vitfast.patch_embed_bwd(dtokens.to(images.dtype), images, weight, need_images,
                                                             need_weight)
    rest = [None] * 4
    if any(need_rest):
        per_row = dtokens.sum(0, dtype=torch.float32)  # [PREFIX + N, D]
        patches, cls_row = per_row[ctx.prefix:], per_row[0]
        for i, grad in enumerate((patches.sum(0), cls_row, cls_row, patches)):
            rest[i] = grad.to(ctx.dtypes[i]) if need_rest[i] else None
    return dimages if need_images else None, dweight if need_weight else None, *rest, None, None


torch.library.register_autograd("vitfast::patch_embed_fwd", _backward, setup_context=_setup_context)


def _grad_buffer(t: Tensor) -> Tensor:
    """A buffer for the gradient of the 4-D ``t``: channels-last when ``t`` is, else contiguous."""
    n, c, h, w = t.shape
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return runtime.empty(n, h, w, c, dtype=t.dtype, device=t.device).permute(0, 3, 1, 2)
    return runtime.empty(n, c, h, w, dtype=t.dtype, device=t.device)


@torch.library.custom_op("vitfast::patch_embed_bwd", mutates_args=())
def _patch_embed_bwd(
    dtokens: Tensor, images: Tensor, weight: Tensor, compute_dimages: bool, compute_dweight: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of images and weight (each in its tensor's layout and dtype; empty where not asked)."""
    from ..kernels.patch_embed import patch_embed_bwd

    runtime.record_launch("patch_embed_bwd", dtokens, images, weight)
    dimages = _grad_buffer(images) if compute_dimages else None
    dweight = _grad_buffer(weight) if compute_dweight else None
    with runtime.launching(images.device, images.dtype):
        patch_embed_bwd(dtokens, images, weight, dimages, dweight)
    return (images.new_empty(0) if dimages is None else dimages,
            weight.new_empty(0) if dweight is None else dweight)


@_patch_embed_bwd.register_fake
def _(dtokens, images, weight, compute_dimages, compute_dweight):
    return (_grad_buffer(images) if compute_dimages else images.new_empty(0),
            _grad_buffer(weight) if compute_dweight else weight.new_empty(0))


def _fallback(images: Tensor, weight: Tensor, bias: Tensor | None, cls_token: Tensor | None,
              cls_pos: Tensor | None, pos: Tensor | None, dt: torch.dtype) -> Tensor:
    """The eager composite (differentiable) in ``dt``; CLS and positions are cast to it, the bias to the
    images' dtype."""
    x = F.conv2d(images, weight, None if bias is None else bias.to(images.dtype), stride=weight.shape[-1])
    x = x.flatten(2).transpose(1, 2).to(dt)
    if pos is not None:
        x = x + pos.to(dt)
    if cls_token is None:
        return x
    row = cls_token.to(dt) if cls_pos is None else cls_token.to(dt) + cls_pos.to(dt)
    return torch.cat([row.expand(x.shape[0], 1, -1), x], dim=1)


def _check_images_and_weight(images: Tensor, weight: Tensor) -> tuple[int, int]:
    """Shape checks of the image batch against the Conv2d weight; returns the patch grid (rows, cols)."""
    check_float("images", images)
    check_float("weight", weight)
    if images.dim() != 4:
        raise ValueError(f"images must be 4-D [B, C, H, W], got shape {tuple(images.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [D, C, P, P] (Conv2d layout), got shape {tuple(weight.shape)}")
    if weight.shape[2] == 0 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must have a square P x P kernel with P >= 1, got {weight.shape[2]} x "
                         f"{weight.shape[3]} (weight shape {tuple(weight.shape)})")
    check_same_dtype("weight", weight, "images", images)
    _, C, H, W = images.shape
    P = weight.shape[-1]
    if C != weight.shape[1]:
        raise ValueError(f"images has {C} channels but weight expects {weight.shape[1]} "
                         f"(images shape {tuple(images.shape)}, weight shape {tuple(weight.shape)})")
    for side, size in (("height", H), ("width", W)):
        if size == 0 or size % P:
            raise ValueError(f"images {side} {size} is not a positive multiple of the patch size {P} "
                             f"(images shape {tuple(images.shape)})")
    return H // P, W // P


def _as_vector(name: str, t: Tensor, width: int, shapes: tuple[tuple[int, ...], ...]) -> Tensor:
    check_float(name, t)
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(t.shape)}")
    return t.reshape(width)


def _pos_table(pos_embed: Tensor, width: int) -> Tensor:
    """pos_embed [1, R, D] or [R, D] as an [R, D] view."""
    check_float("pos_embed", pos_embed)
    if pos_embed.dim() not in (2, 3) or (pos_embed.dim() == 3 and pos_embed.shape[0] != 1):
        raise ValueError(f"pos_embed must have shape [1, R, D] or [R, D], got {tuple(pos_embed.shape)}")
    if pos_embed.shape[-1] != width:
        raise ValueError(f"pos_embed must have width {width} (the weight's output features), "
                         f"got {pos_embed.shape[-1]} (pos_embed shape {tuple(pos_embed.shape)})")
    return pos_embed[0] if pos_embed.dim() == 3 else pos_embed


def _pos_layout(rows: int, has_cls: bool, grid: tuple[int, int],
                pos_grid: tuple[int, int] | None) -> tuple[int, tuple[int, int]]:
    """(class-position rows, patch grid) that a table of ``rows`` position rows holds."""
    n = grid[0] * grid[1]
    if pos_grid is not None:
        old, prefix = tuple(pos_grid), rows - pos_grid[0] * pos_grid[1]
        if prefix not in (0, 1):
            raise ValueError(f"pos_embed has {rows} rows, which a {old[0]}x{old[1]} pos_grid "
                             f"(plus at most one class position) does not account for")
    elif rows in (n, n + 1):
        old, prefix = grid, rows - n
    else:
        # Like timm, an unnamed grid is taken to be square.
        side = {p: math.isqrt(max(rows - p, 0)) for p in (0, 1)}
        square = [p for p in (0, 1) if side[p] ** 2 == rows - p and rows - p > 0]
        if not square:
            raise ValueError(f"pos_embed has {rows} rows: not {n} or {n + 1} for the images' "
                             f"{grid[0]}x{grid[1]} grid, nor a square grid; pass pos_grid")
        prefix = square[-1] if has_cls else square[0]
        old = (side[prefix], side[prefix])
    if prefix == 1 and not has_cls:
        raise ValueError(f"pos_embed has {rows} rows, a class position plus a {old[0]}x{old[1]} grid, "
                         f"but cls_token is None; pass the class token or drop pos_embed's first row")
    return prefix, old


def _resample_grid(pos: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """Bicubic resampling of [old_h·old_w, D] positions to [new_h·new_w, D], as timm's
    ``resample_abs_pos_embed`` does it (fp32, or float64 for a float64 table; align_corners=False,
    antialias=True)."""
    width = pos.shape[-1]
    grid = pos.to(torch.promote_types(pos.dtype, torch.float32)).reshape(1, *old, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False, antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(new[0] * new[1], width).to(pos.dtype)


@fx_traceable
def patch_embed(
    images: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    cls_token: Tensor | None = None,
    pos_embed: Tensor | None = None,
    *,
    resample_pos_embed: bool = False,
    pos_grid: tuple[int, int] | None = None,
    channels_first: bool = False,
) -> Tensor:
    """ViT patch embedding: ``cat([cls, conv(images).flatten(2).transpose(1, 2)]) + pos`` in one pass.

    ``images`` [B, C, H, W] (any strides: NCHW and channels-last read in place) is cut into P x P
    patches (H and W multiples of P, N = (H/P)·(W/P)) and projected by ``weight`` [D, C, P, P] (a
    stride-P ``Conv2d``'s weight) plus ``bias`` [D]. Returns tokens [B, N, D], or [B, 1 + N, D] with
    the class token [1, 1, D] or [D] in row 0. The result has the images' dtype; ``weight`` must share
    it, ``bias``, ``cls_token`` and ``pos_embed`` may be any float dtype (added in fp32 on the kernel).
    Under ``torch.autocast`` the images, weight and bias are cast to the autocast dtype, as Conv2d's
    are, and the result has that dtype promoted with the class token's and the position table's (fp32
    for fp32 parameters, as eager's ``cat`` and ``+`` give).

    ``pos_embed`` [1, R, D] or [R, D] is read by its row count R:

    * R = N + 1: row 0 is the class token's position, rows 1.. the patches' (needs ``cls_token``);
    * R = N: patch positions only; a given class token is added without a position term (timm's
      ``no_embed_class=True``).

    A table for another grid (by default taken to be square, like timm; name it with ``pos_grid``)
    raises ``ValueError`` naming both grids, unless ``resample_pos_embed=True``: then the grid part is
    resampled bicubically as timm's ``resample_abs_pos_embed`` does and the class row kept.

    ``channels_first=True`` stores the same tokens channel-major, as a Conv2d stores its output: the
    result is the transpose of a contiguous [B, D, N] (or [B, D, 1 + N]), so ``out.transpose(1, 2)``
    viewed as [B, D, H/P, W/P] is the convolution's contiguous NCHW output, with no copy.

    Runs one Triton launch; its backward runs the weight and image gradients as Triton GEMMs (each
    only when needed) and reduces bias, class and position gradients with torch. Every parameter is
    read through its strides (a slice, a transposed weight, one value broadcast with ``expand``).
    CPU tensors without Triton's interpreter, and float64 inputs (warned once), take the PyTorch
    composite.

    >>> images = torch.randn(2, 3, 224, 224)
    >>> conv = torch.nn.Conv2d(3, 768, 16, stride=16)
    >>> cls, pos = torch.randn(1, 1, 768), torch.randn(1, 197, 768)
    >>> patch_embed(images, conv.weight, conv.bias, cls, pos).shape
    torch.Size([2, 197, 768])
    """
    check_float("images", images)
    images, weight, bias = autocast.operands(images.device, images, weight, bias)
    grid = _check_images_and_weight(images, weight)
    width = weight.shape[0]
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, (width,))
    cls_vec = None if cls_token is None else _as_vector("cls_token", cls_token, width, ((1, 1, width), (width,)))
    table = None if pos_embed is None else _pos_table(pos_embed, width)
    check_same_device(images=images, weight=weight, bias=bias, cls_token=cls_token, pos_embed=pos_embed)

    cls_pos = pos = None
    if table is not None:
        prefix, old = _pos_layout(table.shape[0], cls_token is not None, grid, pos_grid)
        pos = table[prefix:]
        cls_pos = table[0] if prefix else None
        if old != grid:
            if not resample_pos_embed:
                raise ValueError(f"pos_embed covers a {old[0]}x{old[1]} patch grid but the images give "
                                 f"{grid[0]}x{grid[1]}; pass resample_pos_embed=True to interpolate it")
            pos = _resample_grid(pos, old, grid)

    out_dtype = autocast.result_dtype(images, cls_vec, cls_pos, pos)
    if kernel_path("patch_embed", images, bias, cls_vec, cls_pos, pos):
        runtime.record_launch("patch_embed", images, weight)
        return call(_patch_embed_fwd, images, weight, bias, cls_vec, cls_pos, pos, channels_first, out_dtype)
    out = _fallback(images, weight, bias, cls_vec, cls_pos, pos, out_dtype or images.dtype)
    return out.transpose(1, 2).contiguous().transpose(1, 2) if channels_first else out
