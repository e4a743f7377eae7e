"""Counted FLOPs and bytes of every fused op in one ViT forward, and the time each needs at least.

    python benchmarks/roofline.py                       # ViT-B/16, 224 px, bf16, batch 256, H100 peaks
    python benchmarks/roofline.py --model vit_large --batch 32 --matmul-tflops 790 --copy-gbs 4300
    python benchmarks/roofline.py --gemm-sites --batch 1 32 256 --matmul-tflops 649   # fused against cuBLAS + epilogue
    python benchmarks/roofline.py --attention-shapes --batch 1 32 256 --copy-gbs 2999  # each attention shape's bound

Bytes are the compulsory HBM traffic of vitfast's fused schedule (each operand read once, each
result written once; weights once per launch), so ``max(flops / matmul peak, bytes / copy peak)``
is a lower bound per launch. The peaks default to what ENVIRONMENT.md records for an H100
(bf16 8192³ matmul ~780 TFLOP/s, device copy ~3.0 TB/s counting read + written); pass the peaks a
``python -m vitfast bench`` run measured to compare a run with its own roofline (benchmarks/NOTES.md).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from vitfast import reference
from vitfast.bench import flops_per_image, shape_of


@dataclass
class Op:
    name: str
    launches: int  # per forward
    flops: float  # per forward, all launches
    bytes: float

    def bound_ms(self, tflops: float, gbs: float) -> float:
        return max(self.flops / (tflops * 1e12), self.bytes / (gbs * 1e9)) * 1e3

    def limiter(self, tflops: float, gbs: float) -> str:
        return "compute" if self.flops / (tflops * 1e12) >= self.bytes / (gbs * 1e9) else "memory"


def vit_ops(model: str, batch: int, img: int, elem: int) -> list[Op]:
    with torch.device("meta"):
        s = shape_of(getattr(reference, model)(img_size=img))
    b, n, d, h, hid, L = batch, s.tokens, s.embed_dim, s.num_heads, s.mlp_hidden, s.depth
    m = b * n  # token rows
    gemm = lambda k, o, extra_rows=0: (2.0 * m * k * o, elem * (m * k + k * o + o + m * o + extra_rows * m * o))  # noqa: E731
    ops = [Op("patch_embed (im2col GEMM + bias + CLS + pos)", 1, 2.0 * b * s.n_patches * s.patch_dim * d,
              elem * (b * s.n_patches * s.patch_dim + s.patch_dim * d + n * d + m * d))]
    qkv_f, qkv_b = gemm(d, 3 * d)
    attn_f = 4.0 * b * h * n * n * (d // h)
    attn_b = elem * (3 * m * d + m * d) + 4.0 * b * h * n  # q, k, v read once, out written, fp32 lse
    proj_f, proj_b = gemm(d, d, extra_rows=1)  # + residual read
    fc1_f, fc1_b = gemm(d, hid)
    fc2_f, fc2_b = gemm(hid, d, extra_rows=1)
    ln_b = elem * 2 * m * d + 2 * d * elem
    ops += [
        Op("layer_norm (x2 per layer)", 2 * L, 0.0, 2 * L * ln_b),
        Op("linear qkv", L, L * qkv_f, L * qkv_b),
        Op("attention", L, L * attn_f, L * attn_b),
        Op("linear proj + residual", L, L * proj_f, L * proj_b),
        Op("mlp fc1 + GELU", L, L * fc1_f, L * fc1_b),
        Op("mlp fc2 + residual", L, L * fc2_f, L * fc2_b),
        Op("head (CLS rows)", 1, 2.0 * b * d * s.num_classes, elem * (b * d + d * s.num_classes + b * s.num_classes)),
    ]
    counted = sum(o.flops for o in ops)
    assert abs(counted - batch * flops_per_image(s)) <= 1e-6 * counted, "FLOP counts disagree with vitfast.bench"
    return ops


def modern_ops(batch: int, elem: int, table_elem: int = 4) -> list[Op]:
    """The ops EVA02 and SigLIP add, per launch: attention with the 2-D rotary embedding (q and k rotated
    as they are loaded: 3 FLOPs per element of each, the [sin | cos] table read once, fp32), the SwiGLU
    fc1 (two GEMMs sharing x's tiles, silu(gate)·value in the epilogue, one write of the hidden
    activations), its sub-LN, and the attention-pooling head's short-query attention and k | v GEMM.
    Shapes: EVA02-B/14 at 224 px (256 patches + CLS, width 768, 12 heads, SwiGLU hidden 2048) and
    SigLIP-B/16's head (196 tokens, 1 query, width 768, 12 heads)."""
    b, d, h = batch, 768, 12
    n, hid = 257, 2048
    m = b * n
    rope_f = 4.0 * b * h * n * n * (d // h) + 2 * 3.0 * m * d
    rope_b = elem * 4 * m * d + 4.0 * b * h * n + table_elem * (n - 1) * 2 * (d // h)
    swiglu_f = 2.0 * m * d * 2 * hid + 5.0 * m * hid  # silu (≈4) and the product, per hidden element
    swiglu_b = elem * (m * d + 2 * hid * d + 2 * hid + m * hid)
    pool_n, queries = 196, 1
    pool_f = 4.0 * b * h * queries * pool_n * (d // h)
    pool_b = elem * (queries * d + 2 * b * pool_n * d + b * queries * d) + 4.0 * b * h * queries
    kv_f = 2.0 * b * pool_n * d * 2 * d
    kv_b = elem * (b * pool_n * d + 2 * d * d + 2 * d + b * pool_n * 2 * d)
    return [
        Op("EVA02-B attention + 2-D RoPE (1 prefix token)", 1, rope_f, rope_b),
        Op("EVA02-B SwiGLU fc1 (gated_linear)", 1, swiglu_f, swiglu_b),
        Op("EVA02-B sub-LN over the hidden activations", 1, 0.0, elem * 2 * m * hid + 2 * hid * elem),
        Op("SigLIP-B MAP head k and v GEMM", 1, kv_f, kv_b),
        Op("SigLIP-B MAP head attention (1 query)", 1, pool_f, pool_b),
    ]


def table(ops: list[Op], tflops: float, gbs: float, batch: int, totals: bool = True) -> str:
    lines = ["| op | launches | GFLOP | MB moved | FLOP/byte | bound by | lower bound ms |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for o in ops:
        intensity = o.flops / o.bytes if o.bytes else float("inf")
        lines.append(f"| {o.name} | {o.launches} | {o.flops / 1e9:,.1f} | {o.bytes / 1e6:,.1f} | {intensity:,.0f} | "
                     f"{o.limiter(tflops, gbs)} | {o.bound_ms(tflops, gbs):.3f} |")
    if not totals:
        return "\n".join(lines)
    total_ms = sum(o.bound_ms(tflops, gbs) for o in ops)
    total_f = sum(o.flops for o in ops)
    lines.append(f"| **total** | {sum(o.launches for o in ops)} | {total_f / 1e9:,.1f} | "
                 f"{sum(o.bytes for o in ops) / 1e6:,.1f} | | | **{total_ms:.3f}** |")
    lines.append("")
    lines.append(f"At the bound: {batch / total_ms * 1e3:,.0f} images/s, {total_f / total_ms / 1e9:,.0f} TFLOP/s "
                 f"({total_f / total_ms / 1e9 / tflops:.0%} of the {tflops:.0f} TFLOP/s matmul peak); "
                 f"{total_f / batch / 1e9:.2f} GFLOP per image.")
    return "\n".join(lines)


def site_table(model: str, batches: list[int], elem: int, tflops: float, gbs: float) -> str:
    """Each GEMM site of one block, one launch, against its cuBLAS tactic (``kernels/gemm_tactic.py``):
    cuBLAS writes the product Z, the epilogue's kernel reads it (and the residual) and writes Y, so the
    tactic moves 2·M·N·e more bytes than the fused kernel (none for QKV, whose bias cuBLAS adds). Both
    GEMMs are taken at ``tflops``; "fused must reach" is the fraction of that speed at which the fused
    kernel's product time equals cuBLAS's product plus the epilogue pass at ``gbs``."""
    with torch.device("meta"):
        s = shape_of(getattr(reference, model)(img_size=224))
    d, hid = s.embed_dim, s.mlp_hidden
    lines = ["| batch | site | M × N × K | GFLOP | fused MB | fused bound ms | bound by | epilogue pass MB | "
             "epilogue ms | fused must reach |", "| ---: | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for batch in batches:
        m = batch * s.tokens
        for site, n, k, residual, epilogue in (("qkv", 3 * d, d, False, False), ("proj + residual", d, d, True, True),
                                               ("fc1 + GELU", hid, d, False, True),
                                               ("fc2 + residual", d, hid, True, True)):
            op = Op(site, 1, 2.0 * m * n * k, elem * (m * k + n * k + n + m * n * (2 if residual else 1)))
            extra = 2.0 * elem * m * n if epilogue else 0.0
            product = Op(site, 1, op.flops, op.bytes - (elem * m * n if residual else 0))
            epilogue_ms = extra / (gbs * 1e9) * 1e3
            product_ms = product.bound_ms(tflops, gbs)
            lines.append(f"| {batch} | {site} | {m} × {n} × {k} | {op.flops / 1e9:,.1f} | {op.bytes / 1e6:,.1f} | "
                         f"{op.bound_ms(tflops, gbs):.3f} | {op.limiter(tflops, gbs)} | {extra / 1e6:,.1f} | "
                         f"{epilogue_ms:.3f} | {product_ms / (product_ms + epilogue_ms):.0%} |")
    return "\n".join(lines)


def attention_table(batches: list[int], elem: int, tflops: float, gbs: float) -> str:
    """Each ViT attention shape (``vitfast/bench/attention_shapes.py``), one forward launch: its counted
    FLOPs (4·B·H·N²·d) and compulsory bytes (Q, K, V read once, O and the fp32 log-sum-exp written once),
    the bound at ``tflops`` and ``gbs``, and what the sm_90 route runs: the resident kernel's padded work
    (query tiles × chunks of keys × head size padded to a power of two, as a multiple of N²·d) or the
    general kernel."""
    import triton

    from vitfast.bench import attention_shapes
    from vitfast.kernels import _resident_configs
    from vitfast.kernels._configs import AttentionKey

    lines = ["| shape | H × N × d | batch | GFLOP | MB | FLOP/byte | bound ms | bound by | sm_90 route | "
             "padded work |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for launch in attention_shapes.launches(list(attention_shapes.SHAPES), batches, ["inference"]):
        n = launch.tokens
        op = Op(launch.name, 1, launch.flops, launch.bytes(elem))
        key = AttentionKey(triton.next_power_of_2(launch.batch * launch.heads), n, n, launch.head_dim,
                           torch.bfloat16 if elem == 2 else torch.float32, 0, 0, False, 0, False)
        why = _resident_configs.reason(key)
        if why is None:
            c = _resident_configs.rule(90, key).kwargs
            rows = triton.cdiv(n, c["BLOCK_M"]) * c["BLOCK_M"]
            route = f"resident {c['BLOCK_M']} × {c['KV_CHUNKS']}·{c['BLOCK_KV']}, {c['GROUPS']} per head"
            block_d = triton.next_power_of_2(launch.head_dim)
            padded = f"{rows * c['KV_CHUNKS'] * c['BLOCK_KV'] * block_d / (n ** 2 * launch.head_dim):.2f}×"
        else:
            route, padded = f"general ({why})", ""
        lines.append(f"| {launch.shape} | {launch.heads} × {n} × {launch.head_dim} | {launch.batch} | "
                     f"{op.flops / 1e9:,.2f} | {op.bytes / 1e6:,.1f} | {op.flops / op.bytes:.0f} | "
                     f"{op.bound_ms(tflops, gbs):.4f} | {op.limiter(tflops, gbs)} | {route} | {padded} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base", choices=sorted(reference.CONFIGS))
    p.add_argument("--batch", type=int, nargs="+", default=[256],
                   help="one batch size (with --gemm-sites or --attention-shapes, several)")
    p.add_argument("--gemm-sites", action="store_true",
                   help="instead: each GEMM site of one block, fused against cuBLAS and a separate epilogue")
    p.add_argument("--attention-shapes", action="store_true",
                   help="instead: each ViT attention shape's forward, its traffic bound and the sm_90 route's tiles")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--bytes-per-element", type=int, default=2, help="2 for bf16/fp16, 4 for fp32")
    p.add_argument("--matmul-tflops", type=float, default=780.0)
    p.add_argument("--copy-gbs", type=float, default=3000.0)
    a = p.parse_args(argv)
    if a.gemm_sites:
        print(f"{a.model}, 224 px, {a.bytes_per_element}-byte elements, one launch per site; GEMMs at "
              f"{a.matmul_tflops:.0f} TFLOP/s, {a.copy_gbs:.0f} GB/s\n")
        print(site_table(a.model, a.batch, a.bytes_per_element, a.matmul_tflops, a.copy_gbs))
        return
    if a.attention_shapes:
        print(f"attention forwards, {a.bytes_per_element}-byte elements; peaks {a.matmul_tflops:.0f} TFLOP/s, "
              f"{a.copy_gbs:.0f} GB/s\n")
        print(attention_table(a.batch, a.bytes_per_element, a.matmul_tflops, a.copy_gbs))
        return
    if len(a.batch) != 1:
        p.error("--batch takes one batch size without --gemm-sites or --attention-shapes")
    a.batch = a.batch[0]
    ops = vit_ops(a.model, a.batch, a.img_size, a.bytes_per_element)
    print(f"{a.model}, {a.img_size} px, batch {a.batch}, {a.bytes_per_element}-byte elements; peaks "
          f"{a.matmul_tflops:.0f} TFLOP/s, {a.copy_gbs:.0f} GB/s\n")
    print(table(ops, a.matmul_tflops, a.copy_gbs, a.batch))
    print("\nRotary attention, SwiGLU and attention pooling, one launch each at the same batch:\n")
    print(table(modern_ops(a.batch, a.bytes_per_element), a.matmul_tflops, a.copy_gbs, a.batch, totals=False))


if __name__ == "__main__":
    main()
