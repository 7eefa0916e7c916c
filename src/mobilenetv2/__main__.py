"""`python -m mobilenetv2` (also what torchrun runs)."""

import sys

from mobilenetv2.cli import main

sys.exit(main())
