"""``python -m vitfast train-check``: fine-tune a small ViT with PyTorch and with vitfast, side by side.

Both runs start from the same weights and see the same batches of scikit-learn's 8×8 digits
(upsampled, a real data set that ships with the package, nothing downloaded), so their loss curves
must agree step by step within ``--tolerance`` (relative), and the loss must fall. Dropout is set to
0 in both so that the two compute the same function: in training with dropout > 0 vitfast runs
PyTorch's own layer (exact dropout semantics), which would make the comparison vacuous.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import reference, runtime
from .convert import optimize


@dataclass
class Curves:
    reference: list[float]
    vitfast: list[float]
    kernels: dict[str, int]  # Triton launches per op over the vitfast run

    def max_rel_diff(self) -> float:
        return max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(self.reference, self.vitfast))

    def falls(self) -> bool:
        k = max(1, len(self.reference) // 5)
        start, end = sum(self.reference[:k]) / k, sum(self.reference[-k:]) / k
        return end < 0.9 * start and sum(self.vitfast[-k:]) / k < 0.9 * sum(self.vitfast[:k]) / k


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


def small_vit(img_size: int, width: int, layers: int, heads: int) -> reference.VisionTransformer:
    model = reference.VisionTransformer(img_size=img_size, patch_size=4, in_channels=1, embed_dim=width,
                                        n_layers=layers, n_heads=heads, mlp_ratio=2.0, n_classes=10)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    return model


def run(steps: int = 40, batch: int = 32, img_size: int = 16, width: int = 32, layers: int = 2, heads: int = 2,
        lr: float = 3e-3, seed: int = 0, device: str | torch.device = "cpu") -> Curves:
    device = torch.device(device)
    torch.manual_seed(seed)
    images, labels = digits(img_size, device)
    ref_model = small_vit(img_size, width, layers, heads).to(device).train()
    fast_model = optimize(copy.deepcopy(ref_model), inplace=True)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).to(device)

    def train(model: nn.Module) -> list[float]:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        losses = []
        for step in range(steps):
            idx = order[(step * batch) % len(order):][:batch]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ref_losses = train(ref_model)
    with runtime.count_launches() as launches:
        fast_losses = train(fast_model)
    return Curves(ref_losses, fast_losses, dict(launches))


def main(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"train-check on {device} ({runtime.backend_name(device)}): ViT width {args.width}, {args.layers} layers, "
          f"{args.heads} heads, digits at {args.img_size}px, batch {args.batch}, {args.steps} AdamW steps", flush=True)
    curves = run(steps=args.steps, batch=args.batch, img_size=args.img_size, width=args.width, layers=args.layers,
                 heads=args.heads, lr=args.lr, seed=args.seed, device=device)
    print(f"{'step':>4}  {'PyTorch loss':>12}  {'vitfast loss':>12}  {'rel. diff':>9}")
    for i, (a, b) in enumerate(zip(curves.reference, curves.vitfast)):
        print(f"{i:>4}  {a:>12.6f}  {b:>12.6f}  {abs(a - b) / max(abs(a), 1e-12):>9.2e}")
    print("Triton launches in the vitfast run: " +
          (", ".join(f"{k} {v}" for k, v in sorted(curves.kernels.items())) or "none (PyTorch fallback)"))
    diff, falls = curves.max_rel_diff(), curves.falls()
    ok = diff <= args.tolerance and falls
    print(f"max relative difference {diff:.2e} (tolerance {args.tolerance:.0e}); loss falls: {falls}; "
          f"{'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest relative difference allowed between the two loss curves at any step")
