"""``python -m vitfast train-check``: fine-tune a small ViT with PyTorch and with vitfast, side by side.

Both runs start from the same weights, see the same batches of scikit-learn's 8×8 digits
(upsampled, a real data set that ships with the package, nothing downloaded) and start from the same
``torch.manual_seed``. The model is the tutorial ViT of ``vitfast.reference`` (PyTorch's
``nn.TransformerEncoderLayer``), or timm's ``VisionTransformer`` when stochastic depth is asked for
(the reference has none). What the check proves:

* without dropout (``--dropout 0``, the default) the two runs compute the same function, stochastic
  depth included (vitfast draws each block's per-sample keep mask with timm's own calls, from the
  same generator): the loss curves must agree step by step within ``--tolerance`` (relative,
  default 1e-3);
* with dropout, vitfast drops inside its kernels from its own Philox stream, so the masks differ
  from PyTorch's and single steps differ by the dropout noise. PyTorch then also trains ``--reruns``
  more copies (default 5; cheap next to the vitfast run) from the same weights and batches under
  other seeds, which measures how far dropout alone moves its curve. The curves are compared as
  means over windows of ``--window`` steps (default 10): vitfast's may differ from PyTorch's by at
  most twice the largest difference between PyTorch and its own reruns (or ``--tolerance``);
* in both cases the loss must fall, and the vitfast run must launch every kernel, forward and
  backward (attention, the GEMM epilogues, LayerNorm, the patch embedding).

With ``--amp`` both runs train under ``torch.autocast`` (bf16 on CUDA; fp16 on CPU, where Triton's
interpreter computes fp16 dots exactly and bf16 ones wrongly), the parameters in fp32, fp16 with a
``GradScaler``. Half-precision rounding moves single steps, so PyTorch also trains once without
autocast, which measures how far autocast alone moves its curve: vitfast's may differ from PyTorch's
autocast curve by at most twice that, plus ``--tolerance`` (default 1e-3). The GEMM, attention and
patch-embedding kernels must receive their operands in the autocast dtype, forward and backward.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import reference, runtime
from .convert import optimize


# What a training step must launch on the kernels (forward and backward).
KERNELS = ("attention", "attention_bwd", "linear_bwd", "layer_norm", "layer_norm_bwd", "patch_embed",
           "patch_embed_bwd")
# What autocast computes in its half dtype (LayerNorm keeps the residual stream's fp32).
HALF_OPS = ("attention", "attention_bwd", "linear", "linear_bwd", "mlp", "patch_embed", "patch_embed_bwd")


@dataclass
class Curves:
    reference: list[float]
    vitfast: list[float]
    kernels: dict[str, int]  # Triton launches per op over the vitfast run
    others: list[list[float]] = field(default_factory=list)  # PyTorch again, under other dropout seeds
    fp32: list[float] | None = None  # with amp: PyTorch without autocast
    dtypes: dict[str, set[torch.dtype]] = field(default_factory=dict)  # operand dtypes per op, vitfast run

    def max_rel_diff(self, window: int = 1, curve: list[float] | None = None) -> float:
        """Largest relative difference between the reference's and ``curve``'s (vitfast's) means over
        consecutive windows of steps."""
        return _max_rel_diff(self.reference, self.vitfast if curve is None else curve, window)

    def noise(self, window: int) -> float:
        """What dropout (PyTorch's reruns under other seeds) and autocast (PyTorch's fp32 run) alone
        move PyTorch's curve by: the largest ``max_rel_diff`` between the reference and those runs
        (0 without them)."""
        runs = self.others + ([] if self.fp32 is None else [self.fp32])
        return max((self.max_rel_diff(window, c) for c in runs), default=0.0)

    def wide_kernels(self, amp_dtype: torch.dtype) -> list[str]:
        """The half-precision ops (GEMMs, attention, patch embedding) that received other operands."""
        return sorted(op for op, got in self.dtypes.items() if op in HALF_OPS and got != {amp_dtype})

    def missing_kernels(self) -> list[str]:
        return [k for k in KERNELS if not self.kernels.get(k)] + ([] if self.kernels.get("mlp") or
                                                                    self.kernels.get("linear") else ["mlp"])

    def falls(self) -> bool:
        k = max(1, len(self.reference) // 5)
        start, end = sum(self.reference[:k]) / k, sum(self.reference[-k:]) / k
        return end < 0.9 * start and sum(self.vitfast[-k:]) / k < 0.9 * sum(self.vitfast[:k]) / k


def _max_rel_diff(base: list[float], other: list[float], window: int) -> float:
    def means(c):
        return [sum(c[i:i + window]) / len(c[i:i + window]) for i in range(0, len(c), window)]
    return max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(means(base), means(other)))


def amp_dtype(device: str | torch.device) -> torch.dtype:
    """What ``--amp`` trains in: bf16 on CUDA, fp16 on CPU (Triton's interpreter's bf16 dots are wrong)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float16


def digits(img_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits, 8×8 grey levels 0..16, as normalised 1×S×S images."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise SystemExit("train-check needs scikit-learn: pip install -e '.[test]'") from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    return x.to(device), torch.tensor(data.target, dtype=torch.long, device=device)


def small_vit(img_size: int, width: int, layers: int, heads: int, dropout: float = 0.0,
              patch_size: int = 4) -> reference.VisionTransformer:
    """The reference ViT with every dropout (nn.Dropout and the attention's) set to ``dropout``."""
    model = reference.VisionTransformer(img_size=img_size, patch_size=patch_size, in_channels=1, embed_dim=width,
                                        n_layers=layers, n_heads=heads, mlp_ratio=2.0, n_classes=10)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = dropout
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = dropout
    return model


def small_timm_vit(img_size: int, width: int, layers: int, heads: int, dropout: float = 0.0,
                   drop_path: float = 0.0, patch_size: int = 4) -> nn.Module:
    """timm's ViT, as its recipes train it: ``dropout`` on the attention probabilities, the
    out-projection and the MLP (attn_drop_rate, proj_drop_rate), stochastic depth growing linearly
    with depth up to ``drop_path`` (drop_path_rate). Its linear layers get PyTorch's default
    initialisation, as the reference ViT's have: with timm's (std 0.02) this tiny model needs hundreds
    of steps before its loss moves, with PyTorch's a few dozen."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise SystemExit("train-check with --drop-path trains timm's ViT: pip install timm") from e
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=1, num_classes=10, embed_dim=width,
                              depth=layers, num_heads=heads, mlp_ratio=2.0, attn_drop_rate=dropout,
                              proj_drop_rate=dropout, drop_path_rate=drop_path)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    return model


def run(steps: int = 40, batch: int = 32, img_size: int = 16, width: int = 32, layers: int = 2, heads: int = 2,
        lr: float = 3e-3, seed: int = 0, device: str | torch.device = "cpu", dropout: float = 0.0,
        drop_path: float = 0.0, model: str = "auto", patch_size: int = 4, reruns: int = 0,
        amp: bool = False) -> Curves:
    """Train PyTorch's model and vitfast's copy side by side; ``model`` is "reference", "timm" or
    "auto" (timm when ``drop_path`` > 0). Both runs start from ``torch.manual_seed(seed)``. With
    ``reruns``, PyTorch also trains ``reruns`` more copies under seeds seed + 1, seed + 2, ... (the
    same weights and batches, other dropout masks): how far dropout alone moves its curve. With
    ``amp`` every run trains under autocast (``amp_dtype(device)``) and PyTorch once more without."""
    device = torch.device(device)
    torch.manual_seed(seed)
    images, labels = digits(img_size, device)
    if model == "auto":
        model = "timm" if drop_path > 0 else "reference"
    if model == "timm":
        ref_model = small_timm_vit(img_size, width, layers, heads, dropout, drop_path, patch_size)
    elif drop_path > 0:
        raise ValueError("the reference ViT (nn.TransformerEncoderLayer) has no stochastic depth; use model='timm'")
    else:
        ref_model = small_vit(img_size, width, layers, heads, dropout, patch_size)
    ref_model = ref_model.to(device).train()
    fast_model = optimize(copy.deepcopy(ref_model), inplace=True)
    rerun_models = [copy.deepcopy(ref_model) for _ in range(reruns)]
    fp32_model = copy.deepcopy(ref_model) if amp else None
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).to(device)
    half = amp_dtype(device)

    def train(model: nn.Module, rng_seed: int, autocast: bool = amp) -> list[float]:
        torch.manual_seed(rng_seed)  # dropout and drop path draw from here
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        scaler = torch.amp.GradScaler(device.type, enabled=autocast and half == torch.float16)
        losses = []
        for step in range(steps):
            idx = order[(step * batch) % len(order):][:batch]
            with torch.autocast(device.type, dtype=half, enabled=autocast):
                loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        return losses

    ref_losses = train(ref_model, seed)
    others = [train(m, seed + i + 1) for i, m in enumerate(rerun_models)]
    fp32_losses = None if fp32_model is None else train(fp32_model, seed, autocast=False)
    with runtime.count_launches() as launches, runtime.launch_dtypes() as dtypes:
        fast_losses = train(fast_model, seed)
    return Curves(ref_losses, fast_losses, dict(launches), others, fp32_losses, dict(dtypes))


def main(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stochastic = args.dropout > 0
    window = args.window if stochastic else 1
    model = args.model if args.model != "auto" else ("timm" if args.drop_path > 0 else "reference")
    half = amp_dtype(device)
    print(f"train-check on {device} ({runtime.backend_name(device)}): {model} ViT width {args.width}, "
          f"{args.layers} layers, {args.heads} heads, dropout {args.dropout}, drop path {args.drop_path}, digits at "
          f"{args.img_size}px, batch {args.batch}, {args.steps} AdamW steps"
          + (f", under {str(half).replace('torch.', '')} autocast" if args.amp else ""), flush=True)
    curves = run(steps=args.steps, batch=args.batch, img_size=args.img_size, width=args.width, layers=args.layers,
                 heads=args.heads, lr=args.lr, seed=args.seed, device=device, dropout=args.dropout,
                 drop_path=args.drop_path, model=model, patch_size=args.patch_size,
                 reruns=args.reruns if stochastic else 0, amp=args.amp)
    noise = curves.noise(window)
    if args.amp:
        tolerance = 2 * noise + (1e-3 if args.tolerance is None else args.tolerance)
    else:
        tolerance = args.tolerance if args.tolerance is not None else (2 * noise if stochastic else 1e-3)
    print(f"{'step':>4}  {'PyTorch loss':>12}  {'vitfast loss':>12}  {'rel. diff':>9}")
    for i, (a, b) in enumerate(zip(curves.reference, curves.vitfast)):
        print(f"{i:>4}  {a:>12.6f}  {b:>12.6f}  {abs(a - b) / max(abs(a), 1e-12):>9.2e}")
    print("Triton launches in the vitfast run: " +
          (", ".join(f"{k} {v}" for k, v in sorted(curves.kernels.items())) or "none (PyTorch fallback)"))
    diff, falls, missing = curves.max_rel_diff(window), curves.falls(), curves.missing_kernels()
    wide = curves.wide_kernels(half) if args.amp else []
    ok = diff <= tolerance and falls and not missing and not wide
    what = "per step" if window == 1 else f"of {window}-step means (dropout masks differ from PyTorch's)"
    if stochastic:
        print(f"PyTorch against its {len(curves.others)} reruns under other dropout seeds"
              + (" and its fp32 run" if args.amp else "") + f": max relative difference of {window}-step means "
              f"{noise:.2e}")
    elif args.amp:
        print(f"PyTorch under autocast against its fp32 run: max relative difference per step {noise:.2e}")
    if args.amp:
        print("operand dtypes in the vitfast run: " + "; ".join(
            f"{op} {', '.join(sorted(str(d).replace('torch.', '') for d in got))}"
            for op, got in sorted(curves.dtypes.items())))
    print(f"max relative difference {what} {diff:.2e} (tolerance {tolerance:.2e}); loss falls: {falls}; "
          f"kernels that did not run: {', '.join(missing) or 'none'}"
          + (f"; kernels not fed {str(half).replace('torch.', '')}: {', '.join(wide) or 'none'}" if args.amp else "")
          + f"; {'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


def probability(text: str) -> float:
    p = float(text)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"a probability in [0, 1) is needed, got {text}")
    return p


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dropout", type=probability, default=0.0,
                        help="dropout probability on the attention probabilities, the attention output and the MLP")
    parser.add_argument("--drop-path", type=probability, default=0.0,
                        help="stochastic depth rate (timm's drop_path_rate; trains timm's ViT)")
    parser.add_argument("--model", choices=("auto", "reference", "timm"), default="auto",
                        help="the reference ViT (nn.TransformerEncoder) or timm's; auto: timm with --drop-path")
    parser.add_argument("--amp", action="store_true",
                        help="train both under torch.autocast (bf16 on CUDA, fp16 on CPU); PyTorch also trains once "
                             "without it to measure what autocast alone moves the curve by")
    parser.add_argument("--window", type=int, default=10,
                        help="with dropout, compare the curves' means over windows of this many steps")
    parser.add_argument("--reruns", type=int, default=5,
                        help="with dropout, PyTorch runs this many more times under other seeds to measure the "
                             "dropout noise")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest relative difference allowed between the two curves (per step without "
                             "dropout, default 1e-3; per window with dropout, default twice PyTorch's own; with "
                             "--amp added to twice what autocast moves PyTorch's curve, default 1e-3)")
