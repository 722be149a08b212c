"""`python -m autonorm`: the `autonorm` command without the console script on PATH."""
import sys

from .cli import main

sys.exit(main())
