"""One module per CLI stage: its typed arguments and its ``run`` (score -> allocate -> search -> train -> evaluate)."""
