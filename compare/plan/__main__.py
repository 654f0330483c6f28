"""``python -m compare.plan``: the planner's command line (``compare.plan.cli``)."""

import sys

from compare.plan.cli import main

sys.exit(main())
