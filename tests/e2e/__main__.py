"""``python -m e2e`` (tests/ on the path): the e2e scenario for a person to watch."""

import sys

from e2e.scenario import main

sys.exit(main())
