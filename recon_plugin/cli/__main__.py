"""``python -m recon_plugin.cli`` (also what torchrun runs with ``-m``)."""

import sys

from . import main

sys.exit(main())
