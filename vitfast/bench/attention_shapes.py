"""ViT attention shapes as ``kernels.attention.attention_fwd`` launches them, for the instruments that study
them one by one: ``benchmarks/hopper_compile.py --vit-attention`` (the sm_90 code of each launch's route
and config, no GPU) and ``benchmarks/attention_shapes.py`` (each launch timed on a GPU against SDPA).

Shapes (heads, head size, tokens): ViT-S/B/L at 224 px with patch 16 (197 tokens), ViT-L/14 at 224
(257), ViT-B/16 at 384 (577), EVA02-B/14 at 224 (257), SigLIP-So400m/14 at 224 and 384 (256 and 729
tokens, no class token, head size 72). Variants: ``inference`` for each, and ``rope`` for EVA02 (its 2-D
rotary embedding: one prefix token, the half-rotation layout). q, k and v are views of the packed
[B, N, 3·H·d] QKV output and the output a view of a [B, N, H·d] buffer, as the op passes them.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

# name -> (heads, head size, tokens, variants)
SHAPES = {
    "vit_s16_224": (6, 64, 197, ("inference",)), "vit_b16_224": (12, 64, 197, ("inference",)),
    "vit_l16_224": (16, 64, 197, ("inference",)), "vit_l14_224": (16, 64, 257, ("inference",)),
    "vit_b16_384": (12, 64, 577, ("inference",)), "eva02_b14_224": (12, 64, 257, ("inference", "rope")),
    "siglip_so400m14_224": (16, 72, 256, ("inference",)), "siglip_so400m14_384": (16, 72, 729, ("inference",)),
}
VARIANTS = ("inference", "rope")


@dataclasses.dataclass(frozen=True)
class Launch:
    shape: str
    batch: int
    variant: str
    heads: int
    head_dim: int
    tokens: int

    @property
    def name(self) -> str:
        return f"{self.shape} b{self.batch} {self.variant}"

    @property
    def flops(self) -> int:
        """4·B·H·N²·d (QKᵀ and PV; CONVENTIONS.md)."""
        return 4 * self.batch * self.heads * self.tokens ** 2 * self.head_dim

    def bytes(self, element: int = 2) -> int:
        """Compulsory traffic: Q, K, V read once, O written once, and the fp32 log-sum-exp."""
        return self.batch * self.tokens * self.heads * (4 * self.head_dim * element + 4)


def launches(shapes, batches, variants=VARIANTS) -> Iterator[Launch]:
    for shape in shapes:
        heads, d, n, has = SHAPES[shape]
        for batch in batches:
            for variant in variants:
                if variant in has:
                    yield Launch(shape, batch, variant, heads, d, n)


def tensors(launch: Launch, dtype: torch.dtype, device: torch.device | str, fill: bool = False) -> dict:
    """``attention.attention_fwd``'s arguments for ``launch``: uninitialized (the compile-only instrument)
    or, with ``fill``, random q, k, v (the timing script)."""
    from ..kernels.attention import Rope

    B, H, d, N = launch.batch, launch.heads, launch.head_dim, launch.tokens
    make = torch.randn if fill else torch.empty
    qkv = make(B, N, 3 * H * d, dtype=dtype, device=device)
    q, k, v = qkv.unflatten(-1, (3, H, d)).permute(2, 0, 3, 1, 4).unbind(0)
    o = torch.empty(B, N, H * d, dtype=dtype, device=device).unflatten(-1, (H, d)).transpose(1, 2)
    rope = None
    if launch.variant == "rope":
        rope = Rope(make(N - 1, 2 * d, dtype=torch.float32, device=device), 1, True)
    return dict(q=q, k=k, v=v, o=o, lse=torch.empty(B, H, N, dtype=torch.float32, device=device),
                key_padding_mask=None, attn_mask=None, scale=d ** -0.5, is_causal=False, rope=rope)


_FACTS = ("registers", "spilled_bytes", "dynamic_shared_bytes", "tma", "wgmma")


def _launched(drv, launch: Launch, dtype: torch.dtype) -> list:
    from ..kernels import attention

    drv.trace = []
    attention.attention_fwd(**tensors(launch, dtype, "cpu"))
    kernels = [k for k, _, _ in drv.trace]
    drv.trace = None
    return kernels


def static_table(shapes, batches, variants=VARIANTS, dtype: torch.dtype = torch.bfloat16,
                 general: bool = True) -> list[dict]:
    """One row per launch of ``launches(shapes, batches, variants)``: the forward its route takes on sm_90
    (``attention.routes``: the resident kernel, or the general one and why) and its config, compiled as
    the JIT specializes it (through the stand-in driver: CPU tensors, nothing runs), with its registers,
    spilled bytes, dynamic shared memory and whether its PTX holds TMA and wgmma; with ``general``, the
    same facts of the general kernel's pick for that launch. Runs in a process that has not initialized
    CUDA, with TRITON_INTERPRET unset."""
    from ..kernels import attention, attention_resident
    from . import host_driver
    from .kernel_facts import static_facts, variant_id

    chosen = list(launches(shapes, batches, variants))
    per_launch: list[tuple[dict, list[list]]] = []
    with host_driver.active() as drv:
        for launch in chosen:
            attention.ran.clear()
            runs = [_launched(drv, launch, dtype)]
            route = attention.routes()[0]
            if general:
                takes = attention_resident.takes
                attention_resident.takes = lambda *args: "the general kernel's figures"
                try:
                    runs.append(_launched(drv, launch, dtype))
                finally:
                    attention_resident.takes = takes
            per_launch.append((route, runs))
        facts = {row["variant"]: row for row in static_facts(drv)}

    def describe(kernels: list) -> dict:
        (kernel,) = kernels
        row = facts[variant_id(kernel)]
        return {"kernel": row["kernel"], "config": {**row["tile"], "num_warps": row["num_warps"],
                                                    "num_stages": row["num_stages"]},
                **{f: row[f] for f in _FACTS}}

    table = []
    for launch, (route, runs) in zip(chosen, per_launch):
        row = {"shape": launch.shape, "batch": launch.batch, "variant": launch.variant, "heads": launch.heads,
               "head_dim": launch.head_dim, "tokens": launch.tokens, "dtype": str(dtype).removeprefix("torch."),
               **describe(runs[0]), "config": route["config"]}  # the chosen config: GROUPS is no constexpr
        if "reason" in route:
            row["reason"] = route["reason"]
        else:
            row["programs"] = launch.batch * launch.heads * route["config"]["GROUPS"]
        if general:
            row["general"] = describe(runs[1])
        table.append(row)
    return table


def meets_target(row: dict) -> bool:
    """Whether a row of ``static_table`` holds the issue's target: a resident pick without spills, on TMA
    and wgmma (a launch routed to the general kernel is judged there, by its reason)."""
    if row["kernel"] != "_attention_resident_fwd_kernel":
        return "reason" in row
    return row["spilled_bytes"] == 0 and row["tma"] and row["wgmma"]
