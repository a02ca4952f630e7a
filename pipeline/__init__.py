"""The Ray job that wires the grounding library into a distributed, streaming build of grounding shards."""
