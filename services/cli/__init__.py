"""The `autoglm` command line."""
