"""Procedural CT phantoms for training and testing detectors (no patient data)."""
