"""Face detection (MTCNN, RetinaFace), the detection contract and selection, alignment, paste-back, geometry."""
