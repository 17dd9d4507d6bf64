"""Self-supervised site adaptation (``recon-plugin adapt``): gate, versioned model, overlay.

The modes ``adapt --mode`` offers are defined here, once (importing this package stays light:
the CLI builds its parser from them); each names terms of :mod:`recon_plugin.training.selfsup`.
"""

MODES = ("ssdu", "mc-ei", "ssdu+teacher", "mc-ei+teacher")
