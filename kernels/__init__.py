"""Triton kernels and their launchers (installed as ``vitfast.kernels``).

One file per fused op. Only ``@triton.jit`` code and thin launchers that compute grids and strides
live here: no ``nn.Module``, no autograd, no input validation beyond what a launcher assumes (the
ops in ``vitfast.ops`` validate before they call in).

This folder sits at the top of the repository, so a process started there (``python -m pytest``,
``python -c``) finds it as a top-level ``kernels`` before the unrelated package of that name, which
Hugging Face's transformers imports. Imported under that name, this file hands the import on to that
package, or reports it missing: the repository's kernels are only ever ``vitfast.kernels``.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _installed_kernels():
        """Import the ``kernels`` package found on ``sys.path`` outside this repository, in this
        module's place in ``sys.modules`` (the import statement returns what is there when it ends)."""
        root = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
        path = [p for p in sys.path if isinstance(p, str) and os.path.realpath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec(__name__, path)
        if spec is None:
            raise ModuleNotFoundError(
                f"No module named 'kernels' outside {root} (the repository's kernels/ folder is "
                "vitfast.kernels)", name=__name__)
        module = importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module
        spec.loader.exec_module(module)

    _installed_kernels()
