"""A factory file that calls sys.exit when imported (a script, not a module)."""

import sys

sys.exit(3)
