"""Key Object Selection results (PS3.3 A.35.4; PS3.16 TID 2010)."""

from triage_node.results.ko.encoder import KeyImage, KosEncoder, key_images

__all__ = ["KeyImage", "KosEncoder", "key_images"]
