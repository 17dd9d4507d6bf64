"""recon_plugin: scanner-side MRI reconstruction with pruned unrolled networks.

Heavy dependencies (torch, sigpy, pydicom) are imported by the modules that need them, not here.
"""

__version__ = "0.1.0"
