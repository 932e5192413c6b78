"""Per-image tuning: classic ZSSR (zssr.py) and the NTIRE 2025 IQA-guided refinement (ntire_refine.py), sharing
one grouped training engine (engine.py)."""
MODES = ("zssr", "ntire_tune")
