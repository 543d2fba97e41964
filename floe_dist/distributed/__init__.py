"""Everything that knows about ranks, process groups and DeepSpeed lives in this package."""
