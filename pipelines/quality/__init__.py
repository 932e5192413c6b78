"""Image quality and identity: NIQE, pyiqa metrics, ArcFace ID similarity, FID, the NTIRE score, evaluation, best-of, authenticity."""
