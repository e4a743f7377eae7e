"""A ViT's GEMM sites as ``kernels.linear.linear_fwd`` launches them, for the instruments that study them
one by one: ``benchmarks/hopper_compile.py --vit-sites`` (the sm_90 code of each site's config, no GPU)
and ``benchmarks/gemm_sites.py`` (each site timed on a GPU against cuBLAS).

A block of width D has four sites, each with its epilogue: QKV (D → 3D, bias), the attention's
out-projection (D → D, bias + residual), fc1 (D → 4D, bias + GELU) and fc2 (4D → D, bias + residual),
over M = 197 · batch token rows (224 px, patch 16, a class token). Variants: ``inference``; ``gelu_tanh``
and ``quick_gelu`` for fc1 (timm's approximate GELU, OpenAI CLIP); ``layer_scale`` for the residual sites
(timm's LayerScale); ``training`` (the pre-activation stored behind an activation, dropout, and
stochastic depth's row factor on the residual sites); and the backward's products ``dX`` (dZ · W, W
read as [K, N]) and ``dW`` (dZᵀ · X, both read transposed).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

MODELS = {"vit_s": 384, "vit_b": 768, "vit_l": 1024, "vit_h": 1280}  # width D
TOKENS = 197
# SwiGLU models' gated fc1 (``gated_linear_fwd``): width, hidden width H, tokens. EVA02-B/14 at 224 px.
GATED = {"eva02_b": (768, 2048, 257)}
SITES = ("qkv", "proj", "fc1", "fc2")
VARIANTS = ("inference", "gelu_tanh", "quick_gelu", "layer_scale", "training", "dX", "dW")


@dataclasses.dataclass(frozen=True)
class Launch:
    """One ``linear_fwd`` launch: a site of a model at a batch size, in one variant."""

    model: str
    batch: int
    site: str
    variant: str
    m: int  # output rows
    n: int  # output columns
    k: int  # reduction
    activation: str = "none"
    bias: bool = False
    residual: bool = False
    scale: bool = False
    preact: bool = False
    dropout: bool = False
    row_scale: bool = False
    x_transposed: bool = False  # X lies as [K, M] (dW's dZᵀ)
    w_transposed: bool = False  # W lies as [K, N] (dX's W, dW's X)

    @property
    def name(self) -> str:
        return f"{self.model} b{self.batch} {self.site} {self.variant}"

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k


def _shape(width: int, site: str) -> tuple[int, int, str, bool]:
    """(N, K, activation, residual) of a site at ``width``."""
    return {"qkv": (3 * width, width, "none", False), "proj": (width, width, "none", True),
            "fc1": (4 * width, width, "gelu", False), "fc2": (width, 4 * width, "none", True)}[site]


def site_launch(model: str, batch: int, site: str, variant: str) -> Launch | None:
    """The launch of ``site`` in ``variant``, or None where the variant does not apply to the site
    (an fc1 activation on a residual site, LayerScale on QKV). A model of ``GATED`` has one site,
    "swiglu", in inference and training (pre-activations stored, dropout)."""
    if model in GATED:
        width, hidden, tokens = GATED[model]
        if site != "swiglu" or variant not in ("inference", "training"):
            return None
        training = variant == "training"
        return Launch(model, batch, site, variant, tokens * batch, hidden, width, "silu", bias=True, preact=training,
                      dropout=training)
    n, k, act, residual = _shape(MODELS[model], site)
    m = TOKENS * batch
    base = Launch(model, batch, site, variant, m, n, k, act, bias=True, residual=residual)
    if variant == "inference":
        return base
    if variant in ("gelu_tanh", "quick_gelu"):
        return dataclasses.replace(base, activation=variant) if site == "fc1" else None
    if variant == "layer_scale":
        return dataclasses.replace(base, scale=True) if residual else None
    if variant == "training":
        if site == "qkv":
            return None  # the same launch as inference
        return dataclasses.replace(base, preact=act != "none", dropout=True, row_scale=residual)
    if variant == "dX":  # [M, N] dZ times W [N, K] read as a [K, N] nn.Linear weight: dX [M, K]
        return Launch(model, batch, site, variant, m, k, n, w_transposed=True)
    if variant == "dW":  # dZᵀ [N, M] times X [M, K] read as a [K, M] weight: dW [N, K]
        return Launch(model, batch, site, variant, n, k, m, x_transposed=True, w_transposed=True)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def launches(models, batches, sites=SITES, variants=VARIANTS) -> Iterator[Launch]:
    for model in models:
        for batch in batches:
            for site in (("swiglu",) if model in GATED else sites):
                for variant in variants:
                    launch = site_launch(model, batch, site, variant)
                    if launch is not None:
                        yield launch


def tensors(launch: Launch, dtype: torch.dtype, device: torch.device | str, fill: bool = False) -> dict:
    """``linear_fwd``'s arguments for ``launch``: uninitialized (the compile-only instrument) or, with
    ``fill``, values scaled like a trained layer's (the timing script)."""
    def make(*shape, dt=dtype, scale=1.0):
        if not fill:
            return torch.empty(*shape, dtype=dt, device=device)
        return (torch.randn(*shape, device=device) * scale).to(dt)

    m, n, k = launch.m, launch.n, launch.k
    if launch.site == "swiglu":  # gated_linear_fwd's arguments: a packed [2H, K] weight, as timm's SwiGLU
        w, b = make(2 * n, k, scale=k ** -0.5), make(2 * n)
        return dict(x=make(m, k), gate_weight=w[:n], gate_bias=b[:n], value_weight=w[n:], value_bias=b[n:],
                    activation=launch.activation, y=make(m, n), z=make(m, 2 * n) if launch.preact else None,
                    seed=torch.zeros(1, dtype=torch.int64, device=device) if launch.dropout else None,
                    dropout_p=0.1 if launch.dropout else 0.0, keep_scale=1 / 0.9 if launch.dropout else 1.0)
    x = make(k, m).t() if launch.x_transposed else make(m, k)
    w = make(k, n, scale=k ** -0.5).t() if launch.w_transposed else make(n, k, scale=k ** -0.5)
    return dict(
        x=x, weight=w, bias=make(n) if launch.bias else None,
        residual=make(m, n) if launch.residual else None, activation=launch.activation,
        y=make(m, n), z=make(m, n) if launch.preact else None,
        scale=make(n, dt=torch.float32) if launch.scale else None,
        seed=torch.zeros(1, dtype=torch.int64, device=device) if launch.dropout else None,
        dropout_p=0.1 if launch.dropout else 0.0, keep_scale=1 / 0.9 if launch.dropout else 1.0,
        row_scale=torch.ones(m, dtype=torch.float32, device=device) if launch.row_scale else None,
    )


_FACTS = ("registers", "spilled_bytes", "dynamic_shared_bytes", "tma", "wgmma")


def _launched(drv, launch: Launch, dtype: torch.dtype) -> list:
    from ..kernels import gated_linear, linear

    drv.trace = []
    (gated_linear.gated_linear_fwd if launch.site == "swiglu" else linear.linear_fwd)(**tensors(launch, dtype, "cpu"))
    kernels = [k for k, _, _ in drv.trace]
    drv.trace = None
    return kernels


def static_table(models, batches, variants=VARIANTS, dtype: torch.dtype = torch.bfloat16,
                 pointer: bool = True) -> list[dict]:
    """One row per launch of ``launches(models, batches, variants=variants)``: the kernel and config its
    launch key's rule picks on sm_90 (the descriptor kernel wherever the operands allow it), compiled
    as the JIT specializes it (through the stand-in driver: CPU tensors, nothing runs), with its
    registers, spilled bytes, dynamic shared memory and whether its PTX holds TMA and wgmma; with
    ``pointer``, the same facts of the pointer kernel's pick for that launch (what ran before). Runs in a
    process that has not initialized CUDA, with TRITON_INTERPRET unset."""
    from ..kernels import linear_tma
    from . import host_driver
    from .kernel_facts import static_facts, variant_id

    chosen = list(launches(models, batches, variants=variants))
    per_launch: list[list[list]] = []
    with host_driver.active() as drv:
        for launch in chosen:
            runs = [_launched(drv, launch, dtype)]
            if pointer:
                takes = linear_tma.arch_takes_descriptors
                linear_tma.arch_takes_descriptors = lambda device: False
                try:
                    runs.append(_launched(drv, launch, dtype))
                finally:
                    linear_tma.arch_takes_descriptors = takes
            per_launch.append(runs)
        facts = {row["variant"]: row for row in static_facts(drv)}

    def describe(kernels: list) -> dict:
        if len(kernels) != 1:
            return {"kernels": [k.name for k in kernels]}
        row = facts[variant_id(kernels[0])]
        config = {**row["tile"], "num_warps": row["num_warps"], "num_stages": row["num_stages"]}
        if "EPILOGUE_SLICES" in row["constexprs"]:
            config["EPILOGUE_SLICES"] = row["constexprs"]["EPILOGUE_SLICES"]
        return {"kernel": row["kernel"], "config": config, **{f: row[f] for f in _FACTS}}

    table = []
    for launch, runs in zip(chosen, per_launch):
        row = {"model": launch.model, "batch": launch.batch, "site": launch.site, "variant": launch.variant,
               "m": launch.m, "n": launch.n, "k": launch.k, "dtype": str(dtype).removeprefix("torch."),
               **describe(runs[0])}
        if pointer:
            row["pointer"] = describe(runs[1])
        if "config" in row:
            row.update(waves(launch.m, launch.n, row["config"]))
        table.append(row)
    return table


def waves(m: int, n: int, config: dict, sms: int = 132) -> dict:
    """How a persistent launch of ``config``'s tiles over an m × n output fills ``sms`` SMs: its tiles,
    the rounds its programs walk (at most one program per SM), and the fraction of the SMs' rounds
    that hold a tile (1.0: every round full)."""
    tiles = -(-m // config["BLOCK_M"]) * -(-n // config["BLOCK_N"])
    rounds = -(-tiles // sms)
    return {"tiles": tiles, "rounds": rounds, "wave_use": round(tiles / (rounds * sms), 3)}


def meets_target(row: dict) -> bool:
    """Whether a row of ``static_table`` holds the issue's target: the descriptor kernel, no spill,
    TMA and wgmma."""
    return (row.get("kernel") in ("_linear_tma_kernel", "_gated_linear_tma_kernel") and row["spilled_bytes"] == 0
            and row["tma"] and row["wgmma"])
