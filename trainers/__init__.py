"""Training, evaluation and export of detector engines (never imported by the node)."""
