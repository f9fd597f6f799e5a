"""triage-node: a PACS-integrated AI triage node."""

__version__ = "0.1.0"
