"""``python -m rest_ds`` is the ``rest-ds`` command."""
import sys

from .cli import main

if __name__ == "__main__":  # the ranks' forkserver re-imports __main__ under another name
    sys.exit(main())
