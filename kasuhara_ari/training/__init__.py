"""The training library: clips cut out of held or flagged recordings, without the caller's identity."""
