"""Who is calling: API keys (keyed hashes in SQLite), JWT bearer tokens and the admin token."""
