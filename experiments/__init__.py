"""A/B and shadow experiments between model versions (not built yet: issue 5)."""
