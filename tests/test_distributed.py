"""An optimized model trains under data parallelism and activation checkpointing as the plain one does.

* DistributedDataParallel and FSDP2 (``fully_shard`` per block, then the root): two processes (gloo on
  the CPU, kernels in Triton's interpreter; NCCL when two GPUs exist) each train on half of a fixed
  batch for a few steps of SGD with momentum. Every parameter must match the single-process run within
  what plain PyTorch's own distributed-vs-single difference is on the same test, and the kernels must
  have run in the children (a stand-in stepping aside to PyTorch there would otherwise pass).
* ``torch.utils.checkpoint`` around the blocks, and timm's ``set_grad_checkpointing``: the gradients
  equal those without checkpointing, dropout included (the recomputation must draw the same masks),
  and the kernels run in the recomputation.

One start of two processes runs every distributed scenario (the start-up is most of the cost); each
child writes its results to a file the test reads. Run as a script, this file is such a child.
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitfast
from vitfast import runtime

STEPS = 3
BATCH = 4  # two images per rank
DEPTH = 2
KINDS = ("torch", "vitfast")
SCENARIOS = ("ddp", "fsdp2")
# All children together (they take 15 to 40 s): a hang in a collective fails the test instead of blocking CI.
TIMEOUT_S = 180
ATOL = 1e-6  # fp32 rounding of parameters of order 0.1 to 1: about 1e-7 (measured)
# Triton launches one step of the optimized tiny ViT makes at least, forward and backward.
KERNELS_PER_STEP = {"patch_embed": 1, "attention": DEPTH, "layer_norm": 2 * DEPTH + 1,
                    "patch_embed_bwd": 1, "attention_bwd": DEPTH, "linear_bwd": 4 * DEPTH,
                    "layer_norm_bwd": 2 * DEPTH + 1}


def _vit(drop: float = 0.0) -> nn.Module:
    """timm's ViT at its smallest (16 px, 16 patches, width 32, two blocks), the same weights every call."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=10,
                              proj_drop_rate=drop, attn_drop_rate=drop, drop_path_rate=drop)
    with torch.no_grad():  # away from timm's init (ones, zeros, std 1e-6), so every parameter trains visibly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _model(kind: str, device: torch.device) -> nn.Module:
    model = _vit().to(device).train()
    return vitfast.optimize(model) if kind == "vitfast" else model


def _data(device: torch.device, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 16, 16, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    return images.to(device), labels.to(device)


def _train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """STEPS steps of SGD with momentum on the mean cross-entropy of the batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        opt.step()


def _ddp(model: nn.Module, device: torch.device, mesh) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class _BlocksModifiedInPlace(nn.Sequential):
    """timm's blocks, each output then modified in place (``mul_(1)``: the same numbers), as training
    code does: FSDP2 hooks a wrapped module's output for its backward, and a view returned there loses
    that hook once modified in place (the parameters are then never gathered again)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = block(x)
            x.mul_(1.0)
        return x


def _fsdp2(model: nn.Module, device: torch.device, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    model.blocks.__class__ = _BlocksModifiedInPlace  # the parameters keep their names
    fully_shard(model, mesh=mesh)
    return model


def _full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, whole (FSDP2's DTensor shards gathered), on the CPU, by its name in the model."""
    model = getattr(model, "module", model)  # DDP's wrapper
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().cpu().clone()
    return out


def _child(rank: int, world: int, backend: str, out_dir: Path) -> None:
    """One rank: its share of the single-process runs, then every scenario on its half of the batch."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)  # two processes on two cores
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    images, labels = _data(device)
    result: dict = {"single": {}, "launches": {}, "warnings": []}
    start = time.monotonic()

    def done(what: str) -> None:  # in the log the test shows when a child fails or runs out of time
        print(f"rank {rank}: {what} at {time.monotonic() - start:.1f} s", flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if rank == 0:
            result["initial"] = _full_params(_model("torch", device))
        for kind in KINDS[rank::world]:  # each rank one of the single-process runs, before the group forms
            model = _model(kind, device)
            _train(model, images, labels)
            result["single"][kind] = _full_params(model)
            done(f"single-process {kind}")
        dist.init_process_group(backend, init_method=f"file://{out_dir / 'rendezvous'}", rank=rank,
                                world_size=world, **({"device_id": device} if device.type == "cuda" else {}))
        mesh = init_device_mesh(device.type, (world,))
        half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        for scenario, wrap in (("ddp", _ddp), ("fsdp2", _fsdp2)):
            result[scenario] = {}
            for kind in KINDS:
                model = wrap(_model(kind, device), device, mesh)
                with runtime.count_launches() as launches:
                    _train(model, images[half], labels[half])
                result[scenario][kind] = _full_params(model)
                result["launches"][scenario, kind] = dict(launches)
                done(f"{scenario} {kind}")
        dist.destroy_process_group()
    result["warnings"] = [str(w.message) for w in caught if "vitfast" in str(w.message)]
    torch.save(result, out_dir / f"rank{rank}.pt")


def _run_children(backend: str, world: int, out_dir: Path) -> list[dict]:
    """Start every rank (Triton's interpreter on in them when they run on the CPU), wait for them with
    a time limit, and return each rank's results."""
    # The children import what this process imports (pytest may have put the repository on sys.path).
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    if backend == "gloo":
        env["TRITON_INTERPRET"] = "1"  # before the children import triton
    logs = [open(out_dir / f"rank{r}.log", "w+") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(world), "--backend", backend,
                               "--out", str(out_dir)], env=env, stdout=logs[r], stderr=subprocess.STDOUT)
             for r in range(world)]
    deadline = time.monotonic() + TIMEOUT_S
    try:  # until all are done, one fails (the others would wait in a collective) or time runs out
        while (any(p.poll() is None for p in procs) and not any(p.returncode for p in procs)
               and time.monotonic() < deadline):
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = []
    for r, log in enumerate(logs):
        log.seek(0)
        tails.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n" + log.read()[-3000:])
        log.close()
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"the distributed children failed or ran past {TIMEOUT_S} s:\n" + "\n".join(tails))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _check_against_single(ranks: list[dict]) -> list[str]:
    """What fails the rule: per scenario and parameter, vitfast's distributed-vs-single difference may be
    at most twice PyTorch's own plus ATOL; every rank ends with the same parameters; training moved
    them far beyond that bound; the kernels ran in every rank."""
    single = {k: v for r in ranks for k, v in r["single"].items()}
    initial = ranks[0]["initial"]
    problems = []
    for name, p in single["vitfast"].items():
        moved = _max_diff(p, initial[name])
        if moved < 100 * ATOL:
            problems.append(f"{name} moved only {moved:.3g} in the single-process run: the test cannot tell")
    for scenario in SCENARIOS:
        for r, rank in enumerate(ranks[1:], start=1):
            for kind in KINDS:
                for name, p in rank[scenario][kind].items():
                    if not torch.equal(p, ranks[0][scenario][kind][name]):
                        problems.append(f"{scenario} {kind}: rank {r}'s {name} differs from rank 0's")
        torch_run, fast_run = ranks[0][scenario]["torch"], ranks[0][scenario]["vitfast"]
        assert torch_run.keys() == fast_run.keys() == single["vitfast"].keys()
        for name in torch_run:
            torch_diff = _max_diff(torch_run[name], single["torch"][name])
            fast_diff = _max_diff(fast_run[name], single["vitfast"][name])
            if not fast_diff <= 2 * torch_diff + ATOL:
                problems.append(f"{scenario} {name}: max|vitfast {scenario} - vitfast single| = {fast_diff:.3g} > "
                                f"2 * {torch_diff:.3g} (max|torch {scenario} - torch single|) + {ATOL}")
        for r, rank in enumerate(ranks):
            launches = rank["launches"][scenario, "vitfast"]
            for op, per_step in KERNELS_PER_STEP.items():
                if launches.get(op, 0) < STEPS * per_step:
                    problems.append(f"{scenario} rank {r}: {op} ran {launches.get(op, 0)} times, expected at "
                                    f"least {STEPS * per_step}: {launches}")
            if rank["launches"][scenario, "torch"]:
                problems.append(f"{scenario} rank {r}: the plain model launched kernels")
    problems += [f"rank {r} warned: {w}" for r, rank in enumerate(ranks) for w in rank["warnings"]]
    return problems


def _distributed_matches_single(backend: str, world: int, out_dir: Path) -> None:
    problems = _check_against_single(_run_children(backend, world, out_dir))
    assert not problems, "\n".join(problems)


def test_ddp_and_fsdp2_match_single_process(tmp_path):
    """Two gloo processes on the CPU, the kernels in Triton's interpreter. On a CUDA machine the kernels
    run compiled instead, and gloo cannot gather CUDA tensors as FSDP2 does: one NCCL process on the GPU
    there (the wrappers' hooks, DTensor parameters and classes around the kernels; two GPUs: the test
    below). One test for both scenarios: one start of the children serves them, and pytest -n keeps it
    whole."""
    if torch.cuda.is_available():
        _distributed_matches_single("nccl", 1, tmp_path)
    else:
        _distributed_matches_single("gloo", 2, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across two GPUs needs two CUDA devices")
def test_ddp_and_fsdp2_match_single_process_two_gpus(tmp_path):
    _distributed_matches_single("nccl", 2, tmp_path)


# --- activation checkpointing, in this process --------------------------------------------------------

class Checkpointed(nn.Module):
    """A block run under ``torch.utils.checkpoint`` (non-reentrant), as people wrap blocks by hand."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.block, x, use_reentrant=False)


def _checkpointing(model: nn.Module, how: str) -> nn.Module:
    model = copy.deepcopy(model)
    if how == "timm":
        model.set_grad_checkpointing(True)
    else:
        model.blocks = nn.Sequential(*(Checkpointed(b) for b in model.blocks))
    return model


def _grads(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """Parameter gradients of the mean cross-entropy, in the order of named_parameters, and the Triton
    launches of the forward and of the backward apart."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same dropout masks in every run
    with runtime.count_launches() as forward:
        loss = F.cross_entropy(model(images), labels)
    with runtime.count_launches() as backward:
        loss.backward()
    return [p.grad.clone() for p in model.parameters()], forward, backward


# Dropout and stochastic depth on: the recomputation must draw the masks the forward drew.
@pytest.mark.parametrize("how, drop", [("checkpoint", 0.0), ("checkpoint", 0.1), ("timm", 0.1)],
                         ids=["checkpoint", "checkpoint-dropout", "timm-dropout"])
def test_checkpointing_gives_the_same_gradients(how, drop):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = _data(device, batch=2)
    plain = _vit(drop).to(device).train()
    fast = vitfast.optimize(copy.deepcopy(plain))
    names = [n for n, _ in plain.named_parameters()]
    torch_grads, _, _ = _grads(plain, images, labels)
    torch_ckpt, _, _ = _grads(_checkpointing(plain, how), images, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a stand-in stepping aside warns: fail on it
        fast_grads, _, plain_backward = _grads(fast, images, labels)
        fast_ckpt, forward, backward = _grads(_checkpointing(fast, how), images, labels)
    # The blocks' forward launches again inside the backward (the final norm is not checkpointed).
    for op, recomputed in {"attention": DEPTH, "mlp": DEPTH, "layer_norm": 2 * DEPTH}.items():
        assert plain_backward.get(op, 0) == 0, plain_backward
        assert forward.get(op, 0) >= recomputed and backward.get(op, 0) == recomputed, (forward, backward)
    assert backward.get("attention_bwd", 0) == DEPTH, backward
    for name, g, g_ckpt, t, t_ckpt in zip(names, fast_grads, fast_ckpt, torch_grads, torch_ckpt):
        assert g.abs().max() > 0, f"{name} has no gradient"
        fast_diff, torch_diff = _max_diff(g_ckpt, g), _max_diff(t_ckpt, t)
        assert fast_diff <= 2 * torch_diff + 1e-6, (
            f"grad of {name}: max|checkpointed - plain| = {fast_diff:.3g} with vitfast, {torch_diff:.3g} with PyTorch")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one rank of the distributed tests")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--backend", choices=("gloo", "nccl"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        _child(args.rank, args.world, args.backend, args.out)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
