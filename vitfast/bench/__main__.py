"""``python -m vitfast.bench``: the same command as ``python -m vitfast bench``."""
import sys

from .cli import main

sys.exit(main())
