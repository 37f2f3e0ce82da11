"""Command-line entry points. Kept import-light: optimum-cli imports this at start-up."""
