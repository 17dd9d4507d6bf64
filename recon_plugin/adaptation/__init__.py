"""Self-supervised site adaptation (``recon-plugin adapt``): gate, versioned model, overlay.

The modes ``adapt --mode`` offers are defined here, once (importing this package stays light:
the CLI builds its parser from them); each names terms of :mod:`recon_plugin.training.selfsup`.
"""

MODES = ("ssdu", "mc-ei", "ssdu+teacher", "mc-ei+teacher")

# the share of each slice's acquired lines outside the calibration region that an ``ssdu`` step
# scores on (the network sees the rest): 0.2, not the 0.4 of SSDU training from scratch. The
# base network was trained on the site's own acceleration; at 0.4 it is fine-tuned on a much
# sparser sampling than it then reconstructs. On the real files (bench adapt-real's runs,
# ssdu+teacher, 100 steps) the gate's held-out error (native brain; base 0.542) was 0.585 / 0.589
# at 0.4 and 0.552 / 0.553 at 0.2 (docs/FINDINGS.md)
SSDU_LOSS_FRACTION = 0.2

# what an adaptation trains (``adapt --params``), and its default learning rate: ``dc`` (the
# default) only the network's data-consistency weights (``UnrolledNet.dc_parameters``, 7
# scalars for the base): the balance of prior and data at the site's noise and scanner, too
# few parameters to learn one scan's anatomy; ``all`` the whole network. On the real files
# every ``dc`` run was promoted and none made the network alone worse on the real brain; no
# ``all`` run was promoted (bench adapt-real). Log-weights move by about the learning rate per
# Adam step, so ``dc`` needs a larger one (docs/FINDINGS.md)
PARAMS = {"dc": 1e-2, "all": 2e-4}
