"""Per-key rate limits (requests/min and tokens/min)."""
