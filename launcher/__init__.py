"""CLI and launch glue: imports floe_dist, never the reverse."""
