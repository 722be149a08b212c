"""`python -m autonorm.cli`, the same as the `autonorm` command."""
import sys

from autonorm.cli import main

if __name__ == "__main__":  # importing the module (as the import checks do) runs nothing
    sys.exit(main())
