"""shardserve.router."""
