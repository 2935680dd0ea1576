"""``python -m kimi_budget.testing --port 8765``: serve in the foreground."""

import sys

from ._main import main

sys.exit(main())
