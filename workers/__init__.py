"""shardserve.workers."""
