"""shardserve.workers.layers."""
