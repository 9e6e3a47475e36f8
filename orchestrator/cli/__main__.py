"""`python -m orch.cli`."""

import sys

from orch.cli.app import main

sys.exit(main())
