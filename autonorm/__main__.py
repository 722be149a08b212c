"""`python -m autonorm`: the `autonorm` command without the console script on PATH."""
import sys

from .cli import main

if __name__ == "__main__":  # importing the module (as the import checks do) runs nothing
    sys.exit(main())
