"""Configuration: protocol YAML files (schema, ``extends`` and site overlays, header matching)."""
