"""The repository's top-level ``kernels/`` folder installs as ``vitfast.kernels`` and never stands in
for the unrelated ``kernels`` package (Hugging Face's, which transformers imports) in a process
started at the repository root, as ``python -m pytest`` and ``python -c`` are."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_in_root(code):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_import_kernels_at_the_root_gives_the_installed_package():
    lines = _run_in_root("""
        import os, sys
        print(os.path.realpath(sys.path[0] or os.curdir))
        import kernels
        print(os.path.realpath(kernels.__file__))
        import vitfast.kernels._random
        print(os.path.realpath(vitfast.kernels.__file__))
        from transformers import ViTModel
        print(ViTModel.__name__)
    """)
    first_on_path, third_party, ours, model = lines
    root = os.path.realpath(ROOT)
    assert first_on_path == root  # the shadowing this guards against is really in play
    assert not third_party.startswith(root + os.sep), third_party
    assert ours == os.path.join(root, "kernels", "__init__.py")
    assert model == "ViTModel"


def test_kernels_missing_elsewhere_is_reported_missing():
    """With no other ``kernels`` on the path, ``import kernels`` fails as for an absent package
    instead of giving vitfast's launchers under a foreign name."""
    lines = _run_in_root("""
        import sys
        sys.path[:] = [p for p in sys.path if 'site-packages' not in p]  # the root and the stdlib
        try:
            import kernels
        except ModuleNotFoundError as e:
            print(e.name, 'kernels' in sys.modules)
    """)
    assert lines == ["kernels False"]


def test_vitfast_runs_models_without_triton():
    """Without Triton a converted model runs on PyTorch's fallback, settled calls included; its report
    prints (no GEMM site launched) and the bench imports."""
    lines = _run_in_root("""
        import sys
        sys.modules["triton"] = None  # as if it were not installed
        import torch, vitfast
        model = vitfast.reference.vit_tiny(img_size=32, patch_size=8, n_classes=3).eval()
        fast = vitfast.optimize(vitfast.reference.vit_tiny(img_size=32, patch_size=8, n_classes=3).eval())
        fast.load_state_dict(model.state_dict())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            outs = [fast(x) for _ in range(2)]
            print(all(torch.allclose(o, model(x), atol=1e-5) for o in outs), vitfast.runtime.backend_name("cpu"))
        import vitfast.bench.cli
        print(fast.vitfast_report.gemm_sites(), "swapped" in str(fast.vitfast_report))
    """)
    assert lines == ["True pytorch-fallback", "[] True"]
