"""shardserve.cluster."""
