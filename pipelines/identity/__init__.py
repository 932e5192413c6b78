"""Identity preservation from a reference photo (RestorerID, adaptive ID scale)."""
