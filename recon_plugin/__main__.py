"""``python -m recon_plugin ...``: the same as the ``recon-plugin`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
