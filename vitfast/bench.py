"""``python -m vitfast bench``: whole-model inference speed of vitfast against its baselines.

Every implementation runs in the same process, on the same input and the same parameter tensors:

* ``reference-eager``: ``vitfast.reference.VisionTransformer`` in eval under ``torch.inference_mode``,
  so ``nn.TransformerEncoder`` takes its own fused fast path;
* ``timm-eager``: timm's ``VisionTransformer`` (SDPA attention) holding the reference's weights, see
  ``timm_from_reference``. timm's ViT is pre-norm and the reference post-norm, so the two compute
  different functions from the same tensors: a speed comparison, not a parity check;
* ``timm-compile``: that timm model under ``torch.compile`` (``--compile-mode``, recorded);
* ``vitfast``: ``vitfast.optimize`` applied to a deep copy of the reference;
* ``vitfast-cudagraph``: that vitfast model replayed from a ``torch.cuda.CUDAGraph`` (CUDA only).

The run first measures the peaks it reports against (a large matmul, a large device-to-device
copy), then, per model and batch, the first call (compile, autotune, capture) apart from the
steady-state median. On CUDA the median comes from ``triton.testing.do_bench``. Without a GPU the
harness still runs, at the smallest size, timed with a host clock around synchronous CPU work; those
figures are labelled CPU figures everywhere and say nothing about kernel speed (the vitfast rows then
run the plain-PyTorch fallback, never Triton's interpreter).

>>> from vitfast import bench
>>> bench.main(["--quick", "--out", "/tmp/bq"])   # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime as dt
import functools
import gc
import importlib.metadata
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import reference, runtime

BASELINES = ("reference-eager", "timm-eager", "timm-compile")
IMPLEMENTATIONS = ("reference-eager", "timm-eager", "timm-compile", "vitfast", "vitfast-cudagraph")
COMPILE_MODES = ("max-autotune", "max-autotune-no-cudagraphs", "default")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_NOTE = "no GPU: CPU figures, harness smoke only"
PRENORM_NOTE = ("timm rows: timm's ViT is pre-norm, the reference post-norm; same parameter tensors, "
                "different function (a speed comparison, not a parity check)")
RUN_FIELDS = ("device_kind", "gpu", "driver", "torch", "triton", "dtype", "img_size", "date", "compile_mode", "note")
ROW_FIELDS = ("model", "implementation", "label", "batch", "status", "reason", "median_ms", "images_per_s",
              "tflops", "frac_of_peak", "peak_mem_mib", "setup_s", "first_call_s")


def speedup_field(baseline: str) -> str:
    return f"speedup_vs_{baseline}"


# --------------------------------------------------------------------------------------------- FLOPs

@dataclasses.dataclass(frozen=True)
class ViTShape:
    """What the FLOP count needs from a ViT: patches, widths, depth and head."""

    n_patches: int
    patch_dim: int  # in_channels * patch_size**2, the patch embedding's reduction length
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    num_classes: int
    prefix_tokens: int = 1  # CLS (and any register tokens)

    @property
    def tokens(self) -> int:
        return self.n_patches + self.prefix_tokens


def shape_of(model: nn.Module) -> ViTShape:
    """Read the shape of a reference ViT or a timm ``VisionTransformer`` (works on the meta device).

    >>> with torch.device("meta"):
    ...     shape_of(reference.vit_base()).tokens
    197
    """
    conv = model.patch_embed.proj
    patch_dim = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    if isinstance(model, reference.VisionTransformer):
        layer = model.encoder.layers[0]
        return ViTShape(model.patch_embed.n_patches, patch_dim, conv.out_channels, len(model.encoder.layers),
                        layer.self_attn.num_heads, layer.linear1.out_features, model.head.out_features)
    blocks = getattr(model, "blocks", None)
    fc1 = getattr(getattr(blocks[0], "mlp", None), "fc1", None) if blocks else None
    if fc1 is None or not hasattr(blocks[0].attn, "num_heads"):
        raise ValueError(f"model: expected a reference or timm ViT, got {type(model).__name__}")
    head = model.head
    return ViTShape(model.patch_embed.num_patches, patch_dim, conv.out_channels, len(blocks),
                    blocks[0].attn.num_heads, fc1.out_features,
                    head.out_features if isinstance(head, nn.Linear) else 0, model.num_prefix_tokens)


def flops_per_image(shape: ViTShape) -> int:
    """Forward FLOPs of one image: 2 per multiply-add of every matmul, attention as 4·N²·D per layer.

    Per layer the token-wise matmuls are QKV (3D²), the out-projection (D²) and the MLP (2·D·hidden);
    attention adds QKᵀ and PV, 2·N²·D multiply-adds together. Norms, softmax, GELU and adds are not
    counted. ViT-B/16 at 224 px comes to 35.13 GFLOP (CONVENTIONS.md quotes 35.16).
    """
    d, n = shape.embed_dim, shape.tokens
    patch = 2 * shape.n_patches * shape.patch_dim * d
    layer = 2 * n * (4 * d * d + 2 * d * shape.mlp_hidden) + 4 * n * n * d
    return patch + shape.depth * layer + 2 * d * shape.num_classes


# ------------------------------------------------------------------------------------- timm weights

def _timm_sources(ref: reference.VisionTransformer) -> dict[str, torch.Tensor]:
    """Reference tensors under the names timm's ``VisionTransformer`` gives them."""
    src = {"cls_token": ref.cls_token, "pos_embed": ref.pos_embed,
           "patch_embed.proj.weight": ref.patch_embed.proj.weight,
           "patch_embed.proj.bias": ref.patch_embed.proj.bias,
           "head.weight": ref.head.weight, "head.bias": ref.head.bias}
    for i, layer in enumerate(ref.encoder.layers):
        pairs = {"attn.qkv.weight": layer.self_attn.in_proj_weight, "attn.qkv.bias": layer.self_attn.in_proj_bias,
                 "attn.proj": layer.self_attn.out_proj, "mlp.fc1": layer.linear1, "mlp.fc2": layer.linear2,
                 "norm1": layer.norm1, "norm2": layer.norm2}
        for name, thing in pairs.items():
            if isinstance(thing, nn.Module):
                src[f"blocks.{i}.{name}.weight"], src[f"blocks.{i}.{name}.bias"] = thing.weight, thing.bias
            else:
                src[f"blocks.{i}.{name}"] = thing
    return src


def timm_from_reference(ref: reference.VisionTransformer) -> nn.Module:
    """timm's ``VisionTransformer`` with the reference ViT's dimensions and a copy of its weights.

    ``in_proj`` becomes ``qkv``, ``out_proj`` ``proj``, ``linear1/2`` ``fc1/fc2``, ``norm1/2`` stay; the
    patch projection, CLS token, position embedding and head keep their names. The reference has no
    final norm, so timm's is replaced by ``nn.Identity``. Same parameter tensors, different function:
    timm's blocks are pre-norm (``x + attn(norm1(x))``), the reference's post-norm
    (``norm1(x + attn(x))``).

    >>> t = timm_from_reference(reference.vit_tiny(img_size=32, n_layers=2))
    >>> t.blocks[0].attn.qkv.weight.shape
    torch.Size([576, 192])
    """
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    s = shape_of(ref)
    embed = ref.patch_embed
    eps = ref.encoder.layers[0].norm1.eps
    model = TimmViT(img_size=embed.img_size, patch_size=embed.patch_size, in_chans=embed.proj.in_channels,
                    num_classes=s.num_classes, global_pool="token", embed_dim=s.embed_dim, depth=s.depth,
                    num_heads=s.num_heads, mlp_ratio=s.mlp_hidden / s.embed_dim,
                    norm_layer=functools.partial(nn.LayerNorm, eps=eps))
    model.norm = nn.Identity()
    src = _timm_sources(ref)
    params = dict(model.named_parameters())
    if set(params) != set(src):
        raise ValueError(f"timm ViT parameters do not match the reference: only in timm "
                         f"{sorted(set(params) - set(src))}, only in reference {sorted(set(src) - set(params))}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(src[name])
    return model.to(device=ref.cls_token.device, dtype=ref.cls_token.dtype).eval()


# ------------------------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass(frozen=True)
class Timer:
    """Median milliseconds of a call: ``do_bench`` on CUDA, a host clock around synchronous CPU work."""

    device: torch.device
    quick: bool

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return f"triton.testing.do_bench median (warmup {self._budget[0]} ms, rep {self._budget[1]} ms)"
        return f"time.perf_counter median of {self._budget[1]} synchronous CPU calls after {self._budget[0]} warm-up"

    @property
    def _budget(self) -> tuple[int, int]:
        if self.device.type == "cuda":
            return (10, 40) if self.quick else (25, 100)
        return (1, 5) if self.quick else (2, 10)

    def __call__(self, fn: Callable[[], object]) -> float:
        warmup, rep = self._budget
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3


def measure_peaks(device: torch.device, timer: Timer) -> dict:
    """The peaks the run reports against: matmul TFLOP/s and copy GB/s (bytes read plus written)."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024  # on the CPU, large enough that call overhead does not dominate
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU bf16 matmul is no meaningful peak
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    mm_ms = timer(lambda: torch.mm(a, b, out=c))
    del a, b, c
    elems = (1 << 28) if cuda else (1 << 22)  # 1 GiB / 16 MiB of fp32
    src = torch.randn(elems, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return {"matmul_tflops": 2 * n ** 3 / mm_ms / 1e9, "matmul_shape": f"{n}x{n}x{n}",
            "matmul_dtype": str(dtype).replace("torch.", ""), "copy_gbs": nbytes / copy_ms / 1e6,
            "copy_mib": nbytes / 2 / 2 ** 20}


# ----------------------------------------------------------------------------------- implementations

class Skip(Exception):
    """An implementation that cannot run here; its rows record the reason."""


@dataclasses.dataclass
class Impl:
    name: str
    label: str
    module: nn.Module  # whose parameters count towards peak memory
    prepare: Callable[[torch.Tensor], Callable[[], object]]  # per batch: the call that is timed
    setup_s: float = 0.0  # one-time build (weight copy, optimize, torch.compile wrapper)


@dataclasses.dataclass
class Subject:
    """One model under test: the reference ViT (absent for a timm model name) and its timm twin."""

    name: str
    ref: nn.Module | None
    timm: nn.Module
    device: torch.device
    compile_mode: str
    compile_on_cpu: bool
    notes: list[str] = dataclasses.field(default_factory=list)
    vitfast_model: nn.Module | None = None
    vitfast_skip: str | None = None


def _eager(model: nn.Module) -> Callable[[torch.Tensor], Callable[[], object]]:
    return lambda x: (lambda: model(x))


def _reference_eager(s: Subject) -> Impl:
    if s.ref is None:
        raise Skip(f"{s.name} is a timm model; there is no reference ViT for it")
    return Impl("reference-eager", "reference-eager", s.ref, _eager(s.ref))


def _timm_eager(s: Subject) -> Impl:
    return Impl("timm-eager", "timm-eager", s.timm, _eager(s.timm))


def _timm_compile(s: Subject) -> Impl:
    if s.device.type == "cpu" and not s.compile_on_cpu:
        raise Skip("not run on CPU unless named in --baselines (inductor's CPU compile alone takes ~20 s)")
    torch._dynamo.reset()
    compiled = torch.compile(s.timm, mode=s.compile_mode, dynamic=False)
    return Impl("timm-compile", f"timm-compile ({s.compile_mode})", s.timm, _eager(compiled))


def _vitfast_model(s: Subject) -> nn.Module:
    """``vitfast.optimize`` on a deep copy, built once per subject and shared by both vitfast rows."""
    if s.vitfast_model is None and s.vitfast_skip is None:
        try:
            from .convert import optimize
        except ImportError as e:  # the converter may not have landed in this checkout
            s.vitfast_skip = f"vitfast.optimize is not available ({type(e).__name__}: {e})"
        else:
            base = s.ref if s.ref is not None else s.timm
            s.vitfast_model = optimize(copy.deepcopy(base), inplace=True).eval()
            report = getattr(s.vitfast_model, "vitfast_report", None)
            if report is not None:
                s.notes.append(f"vitfast.optimize swapped {len(report.swapped)} module(s), "
                               f"left {len(report.skipped)} alone")
    if s.vitfast_skip is not None:
        raise Skip(s.vitfast_skip)
    return s.vitfast_model


def _vitfast(s: Subject) -> Impl:
    model = _vitfast_model(s)
    if s.device.type == "cuda":
        return Impl("vitfast", "vitfast", model, _eager(model))

    def prepare(x: torch.Tensor) -> Callable[[], object]:
        def call() -> object:
            with runtime.fallback_only():  # never Triton's interpreter: its timings mean nothing
                return model(x)
        return call
    return Impl("vitfast", "vitfast (PyTorch fallback on CPU)", model, prepare)


def _vitfast_cudagraph(s: Subject) -> Impl:
    if s.device.type != "cuda":
        raise Skip("CUDA graphs need a GPU")
    model = _vitfast_model(s)

    def prepare(x: torch.Tensor) -> Callable[[], object]:
        static_x = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # JIT compile and autotune happen here, never during capture
            for _ in range(3):
                model(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static_x)
        return graph.replay
    return Impl("vitfast-cudagraph", "vitfast-cudagraph", model, prepare)


BUILDERS: dict[str, Callable[[Subject], Impl]] = {
    "reference-eager": _reference_eager, "timm-eager": _timm_eager, "timm-compile": _timm_compile,
    "vitfast": _vitfast, "vitfast-cudagraph": _vitfast_cudagraph,
}


# ----------------------------------------------------------------------------------------- one row

def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_row(impl: Impl, x: torch.Tensor, timer: Timer) -> dict:
    """First call (compile, autotune, capture) timed apart; then the steady-state median.

    Peak memory: the most allocated from the start of the batch's setup through two calls, counting
    the implementation's weights (CUDA only).
    """
    device = x.device
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn = impl.prepare(x)
    fn()
    _sync(device)  # a host clock is right here: this is wall time of setup work, synchronised
    first_call_s = time.perf_counter() - t0
    fn()
    _sync(device)
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base + _param_bytes(impl.module)) / 2 ** 20
    ms = timer(fn)
    return {"median_ms": ms, "peak_mem_mib": peak, "first_call_s": first_call_s}


# ----------------------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Config:
    device: torch.device
    models: list[str]
    batches: list[int]
    dtype: str
    img_size: int
    depth: int | None
    baselines: list[str]
    compile_mode: str
    quick: bool
    budget_s: float | None
    out: Path
    seed: int
    compile_on_cpu: bool


def _split(values: list[str] | None) -> list[str]:
    return [v for item in values or [] for v in item.split(",") if v]


def resolve(args: argparse.Namespace) -> Config:
    """Fill the defaults that depend on the device; reject bad names with the argument they came from."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: expected a machine with CUDA, got none")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    models = _split(args.model) or (["vit_base"] if cuda else ["vit_tiny"])
    for name in models:
        if name not in reference.CONFIGS:
            import timm

            if not timm.is_model(name):
                raise ValueError(f"--model: expected one of {sorted(reference.CONFIGS)} or a timm model name, "
                                 f"got {name!r}")
    baselines = _split(args.baselines) or list(BASELINES)
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"--baselines: expected names from {list(BASELINES)}, got {b!r}")
    given = _split(args.batch)
    if not all(b.isdigit() and int(b) > 0 for b in given):
        raise ValueError(f"--batch: expected positive integers, got {given}")
    batches = [int(b) for b in given] or ([256] if cuda else [2] if args.quick else [1, 2])
    depth = args.depth if args.depth is not None else (2 if args.quick and not cuda else None)
    return Config(device, models, batches, args.dtype or ("bf16" if cuda else "fp32"),
                  args.img_size or (224 if cuda else 32), depth, baselines,
                  args.compile_mode or ("default" if args.quick else "max-autotune"), args.quick, args.budget,
                  Path(args.out), args.seed, compile_on_cpu=bool(args.baselines) and "timm-compile" in baselines)


def build_subject(name: str, cfg: Config) -> Subject:
    """The model, seeded, in eval, on the device in the run's dtype, and its timm twin."""
    torch.manual_seed(cfg.seed)
    overrides = {} if cfg.depth is None else {"n_layers": cfg.depth}
    if name in reference.CONFIGS:
        ref = getattr(reference, name)(img_size=cfg.img_size, **overrides).eval()
        timm_model = timm_from_reference(ref)
        notes = ["reference-eager: nn.TransformerEncoder's own fast path (eval, inference_mode)", PRENORM_NOTE]
    else:
        import timm

        ref, notes = None, []
        timm_model = timm.create_model(name, pretrained=False, img_size=cfg.img_size,
                                       **({} if cfg.depth is None else {"depth": cfg.depth})).eval()
    dtype = DTYPES[cfg.dtype]
    for m in (ref, timm_model):
        if m is not None:
            m.to(device=cfg.device, dtype=dtype)
    return Subject(name, ref, timm_model, cfg.device, cfg.compile_mode, cfg.compile_on_cpu, notes)


def machine_info(device: torch.device) -> dict:
    """GPU name, driver and library versions for the result files."""
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    info = {"device_kind": device.type, "torch": torch.__version__, "triton": version("triton"),
            "timm": version("timm"), "cuda": torch.version.cuda, "python": platform.python_version()}
    if device.type != "cuda":
        return {**info, "gpu": f"none (CPU: {platform.processor() or platform.machine()})", "driver": None}
    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {**info, "gpu": torch.cuda.get_device_name(device), "driver": driver}


def fill_derived(rows: list[dict], flops: dict[str, int | None], peak_tflops: float, baselines: list[str]) -> None:
    """images/s, TFLOP/s, fraction of peak, and the speedup over each baseline at the same model and batch."""
    timed = {(r["model"], r["batch"], r["implementation"]): r["median_ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        ms, f = r["median_ms"], flops.get(r["model"])
        ok = r["status"] == "ok"
        r["images_per_s"] = r["batch"] / ms * 1e3 if ok else None
        r["tflops"] = f * r["batch"] / ms / 1e9 if ok and f else None
        r["frac_of_peak"] = r["tflops"] / peak_tflops if r["tflops"] else None
        for b in baselines:
            base = timed.get((r["model"], r["batch"], b))
            r[speedup_field(b)] = base / ms if ok and base else None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def result_stem(record: dict) -> str:
    """``<gpu>-<date>``, or ``cpu-<date>`` for CPU smoke runs."""
    return f"{_slug(record['gpu']) if record['device_kind'] == 'cuda' else 'cpu'}-{record['date']}"


def write_json_csv(record: dict, out: Path) -> tuple[Path, Path]:
    stem = out / result_stem(record)
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    columns = list(RUN_FIELDS) + list(ROW_FIELDS) + [speedup_field(b) for b in record["baselines"]]
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in record["rows"]:
            writer.writerow({c: record[c] if c in RUN_FIELDS else r[c] for c in columns})
    return json_path, csv_path


def write_plot(record: dict, out: Path) -> Path:
    """Throughput against batch size, one panel per model, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in record["rows"]))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(max(6, 5 * len(models)), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for impl in IMPLEMENTATIONS:
            ok = [r for r in record["rows"] if r["model"] == model and r["implementation"] == impl
                  and r["status"] == "ok"]
            if ok:
                pts = sorted((r["batch"], r["images_per_s"]) for r in ok)
                ax.plot(*zip(*pts), marker="o", label=ok[0]["label"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(record["batch"], [str(b) for b in record["batch"]])
        ax.set_ylim(bottom=0)
        ax.set(xlabel="batch", ylabel="images/s", title=f"{model} ({record['dtype']}, {record['img_size']} px)")
        if ax.lines:
            ax.legend(fontsize=8)
    kind = "CPU figures, harness smoke only" if record["device_kind"] == "cpu" else record["gpu"]
    fig.suptitle(f"vitfast bench: {kind}, {record['date']}", fontsize=10)
    fig.tight_layout()
    path = (out / result_stem(record)).with_suffix(".png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def format_table(rows: list[dict], baselines: list[str], markdown: bool = False) -> str:
    """One model's rows as a text table (or a Markdown table for the README)."""
    headers = ["implementation", "batch", "ms/batch", "images/s", "TFLOP/s", "of peak",
               *(f"vs {b}" for b in baselines), "peak MiB", "setup s", "1st call s", "note"]
    body = []
    for r in rows:
        ok = r["status"] == "ok"
        body.append([r["label"], str(r["batch"]), _fmt(r["median_ms"], ".2f"), _fmt(r["images_per_s"], ".1f"),
                     _fmt(r["tflops"], ".3g"), _fmt(r["frac_of_peak"] and 100 * r["frac_of_peak"], ".1f", "%"),
                     *(_fmt(r[speedup_field(b)], ".2f" if (r[speedup_field(b)] or 1) >= 0.01 else ".1g", "x")
                       for b in baselines),
                     _fmt(r["peak_mem_mib"], ".0f"), _fmt(r["setup_s"], ".2f"),
                     _fmt(r["first_call_s"], ".2f"), "" if ok else f"{r['status']}: {r['reason']}"])
    if markdown:
        return "\n".join("| " + " | ".join(c.replace("|", "/") for c in line) + " |"
                         for line in [headers, ["---"] * len(headers), *body])
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in [headers, ["-" * w for w in widths], *body])


def blank_row(model: str, impl: str, label: str, batch: int, status: str = "ok", reason: str = "") -> dict:
    """A result row before measurement; ``fill_derived`` adds the figures computed from the median."""
    return {"model": model, "implementation": impl, "label": label, "batch": batch, "status": status,
            "reason": reason, "median_ms": None, "peak_mem_mib": None, "setup_s": None, "first_call_s": None}


def run(cfg: Config) -> int:
    """Measure, print and write everything; 1 when a row failed (a skipped row is not a failure)."""
    start = time.perf_counter()
    cuda = cfg.device.type == "cuda"
    timer = Timer(cfg.device, cfg.quick)
    cfg.out.mkdir(parents=True, exist_ok=True)
    record = {**machine_info(cfg.device), "schema": 1, "date": dt.date.today().isoformat(),
              "datetime": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "note": "GPU figures" if cuda else f"{CPU_NOTE}; host-clock timings of synchronous CPU work",
              "dtype": cfg.dtype, "batch": cfg.batches, "img_size": cfg.img_size, "depth": cfg.depth,
              "baselines": cfg.baselines, "compile_mode": cfg.compile_mode, "timing": timer.method,
              "argv": sys.argv[1:], "models": {}, "rows": []}
    print(f"vitfast bench on {record['gpu']}: torch {record['torch']}, triton {record['triton']}, {cfg.dtype}, "
          f"img {cfg.img_size}, batch {cfg.batches}", flush=True)
    if not cuda:
        print(f"{CPU_NOTE}: figures below time synchronous CPU work with a host clock; "
              "vitfast rows run the PyTorch fallback", flush=True)
    print("measuring peaks ...", flush=True)
    record["peak"] = peak = measure_peaks(cfg.device, timer)
    print(f"  matmul {peak['matmul_shape']} {peak['matmul_dtype']}: {peak['matmul_tflops']:.3g} TFLOP/s; "
          f"copy {peak['copy_mib']:.0f} MiB: {peak['copy_gbs']:.4g} GB/s", flush=True)
    flops: dict[str, int | None] = {}
    failed = 0

    def save() -> tuple[Path, Path]:  # after every row, so a run cut short still leaves its results
        fill_derived(record["rows"], flops, peak["matmul_tflops"], cfg.baselines)
        return write_json_csv(record, cfg.out)

    impls = [i for i in IMPLEMENTATIONS if i not in BASELINES or i in cfg.baselines]
    for name in cfg.models:
        try:
            subject = build_subject(name, cfg)
        except Exception as e:  # noqa: BLE001 - e.g. a timm model that takes no img_size; the others still run
            reason = f"could not build {name}: {type(e).__name__}: {e}"[:300]
            print(f"[{name}] {reason}", flush=True)
            flops[name] = None
            record["models"][name] = {"shape": None, "gflops_per_image": None, "notes": [reason]}
            record["rows"] += [blank_row(name, i, i, b, "failed", reason) for i in impls for b in cfg.batches]
            failed += 1
            save()
            continue
        try:
            shape = shape_of(subject.ref if subject.ref is not None else subject.timm)
        except ValueError as e:
            shape, flops[name] = None, None
            subject.notes.append(f"FLOPs not counted ({e}): no TFLOP/s or fraction of peak")
        else:
            flops[name] = flops_per_image(shape)
        record["models"][name] = {"shape": shape and dataclasses.asdict(shape),
                                  "gflops_per_image": flops[name] and flops[name] / 1e9, "notes": subject.notes}
        print(f"[{name}] " + (f"{shape.depth} layers, width {shape.embed_dim}, {shape.tokens} tokens, "
                              f"{flops[name] / 1e9:.2f} GFLOP/image" if shape else subject.notes[-1]), flush=True)
        for impl_name in impls:
            try:
                t0 = time.perf_counter()
                impl = BUILDERS[impl_name](subject)
                impl.setup_s = time.perf_counter() - t0
            except Skip as e:
                impl, skip = None, ("skipped", str(e))
            except Exception as e:  # noqa: BLE001 - one broken implementation must not end the run
                impl, skip = None, ("failed", f"{type(e).__name__}: {e}"[:300])
            for batch in cfg.batches:
                elapsed = time.perf_counter() - start
                if impl is None:
                    row = blank_row(name, impl_name, impl_name, batch, *skip)
                elif cfg.budget_s is not None and elapsed > cfg.budget_s:
                    row = blank_row(name, impl_name, impl.label, batch, "skipped", f"time budget of {cfg.budget_s:.0f} s spent")
                else:
                    row = blank_row(name, impl_name, impl.label, batch)
                    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=cfg.device, dtype=DTYPES[cfg.dtype])
                    try:
                        with torch.inference_mode():
                            row.update(measure_row(impl, x, timer), setup_s=impl.setup_s)
                    except Exception as e:  # noqa: BLE001 - e.g. out of memory at one batch size
                        row.update(status="failed", reason=f"{type(e).__name__}: {e}"[:300])
                    del x
                    _free(cfg.device)
                failed += row["status"] == "failed"
                record["rows"].append(row)
                save()
                shown = (f"{row['median_ms']:.2f} ms, {row['images_per_s']:.1f} images/s, "
                         f"first call {row['first_call_s']:.2f} s") if row["status"] == "ok" \
                    else f"{row['status']}: {row['reason']}"
                print(f"  {impl_name} batch {batch}: {shown}", flush=True)
            del impl
            _free(cfg.device)
        write_plot(record, cfg.out)
        del subject
        torch._dynamo.reset()
        _free(cfg.device)
    record["wall_s"] = time.perf_counter() - start
    json_path, csv_path = save()
    png_path = write_plot(record, cfg.out)
    for name in cfg.models:
        gflops = record["models"][name]["gflops_per_image"]
        print(f"\n{name}: {'?' if gflops is None else f'{gflops:.2f}'} GFLOP/image, {cfg.dtype}, img {cfg.img_size}"
              + ("  [CPU figures, harness smoke only]" if not cuda else ""))
        print(format_table([r for r in record["rows"] if r["model"] == name], cfg.baselines))
        for note in record["models"][name]["notes"]:
            print(f"  note: {note}")
    print(f"\npeak: matmul {peak['matmul_tflops']:.3g} TFLOP/s ({peak['matmul_dtype']}), copy "
          f"{peak['copy_gbs']:.4g} GB/s{'' if cuda else '  [CPU figures]'}; timing: {timer.method}")
    print(f"wrote {json_path}, {csv_path}, {png_path}")
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m vitfast bench`` (and ``python -m vitfast.bench``)."""
    parser.add_argument("--model", nargs="+", metavar="NAME",
                        help=f"{', '.join(reference.CONFIGS)} or a timm model name (random weights, no "
                             "download); default vit_base on a GPU, vit_tiny on the CPU")
    parser.add_argument("--batch", nargs="+", metavar="N", help="one or several batch sizes (default 256 on a GPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--img-size", type=int, help="default 224 on a GPU, 32 on the CPU")
    parser.add_argument("--depth", type=int, help="override the number of layers (default: the model's; 2 with "
                                                  "--quick on the CPU)")
    parser.add_argument("--baselines", nargs="+", metavar="NAME", help=f"any of {', '.join(BASELINES)} (default all; "
                        "on the CPU timm-compile runs only when named here)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES,
                        help="torch.compile mode of timm-compile (default max-autotune; default with --quick)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when there is one")
    parser.add_argument("--quick", action="store_true", help="short timing; on the CPU also 2 layers and batch 2")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="start no new measurement after this many seconds (the rest are recorded as skipped)")
    parser.add_argument("--out", default="bench-results", metavar="DIR", help="where JSON, CSV and PNG go")
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitfast.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv), parser)


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        cfg = resolve(args)
    except ValueError as e:
        parser.error(str(e))
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
