"""``python -m inferlink_audit`` is the ``inferlink-audit`` command."""

import sys

from .cli import main

sys.exit(main())
