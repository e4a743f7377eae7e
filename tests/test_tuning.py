"""VITFAST_AUTOTUNE=0 (the GPU test suite's setting) still fits each GEMM tile to its shape.

Triton calls an autotuner's pruner only when it holds several configs, so the pruned kernels keep
their whole list and their pruners return one config. These run on the config lists and pruners
themselves (no launch), so the CPU checks what only a GPU would run."""
import pytest
import torch

from vitfast.kernels import gated_linear, linear, patch_embed

_GEMM_SMEM = 227 * 1024  # per block on H100/H200


def _smem(config, elem: int, weight_tiles: int = 1) -> int:
    c = config.kwargs
    return config.num_stages * (c["BLOCK_M"] + weight_tiles * c["BLOCK_N"]) * c["BLOCK_K"] * elem


CASES = {  # name: (prune, configs, named args for a large fp32 problem, weight tiles)
    "linear": (linear._prune, linear._hopper_configs(), dict(M=4096, N=3072, K=768), 1),
    "gated_linear": (gated_linear._prune, gated_linear._hopper_configs(), dict(M=4096, H=3072, K=768), 2),
    "patch_embed": (patch_embed._pruner("D", "K", "X"), patch_embed._hopper_configs(), dict(D=768, K=768), 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_without_autotuning_the_pruner_keeps_one_config_that_fits(name, monkeypatch):
    prune, configs, args, weight_tiles = CASES[name]
    x = torch.empty(1, dtype=torch.float32)
    assert len(configs) > 1, "a single config would never reach the pruner"
    monkeypatch.setenv("VITFAST_AUTOTUNE", "0")
    kept = prune(configs, {**args, "X": x})
    assert len(kept) == 1
    assert _smem(kept[0], 4, weight_tiles) <= _GEMM_SMEM
    monkeypatch.setenv("VITFAST_AUTOTUNE", "1")
    assert len(prune(configs, {**args, "X": x})) > 1
