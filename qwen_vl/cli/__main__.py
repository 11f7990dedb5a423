"""``python -m qwen_vl.cli``."""

import sys

from . import main

sys.exit(main())
