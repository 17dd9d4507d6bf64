"""Self-supervised site adaptation (``recon-plugin adapt``): gate, versioned model, overlay."""
