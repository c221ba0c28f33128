"""``python -m deqir_fast.cli``, the same program as ``deqir-fast``."""
import sys

from . import main

sys.exit(main())
