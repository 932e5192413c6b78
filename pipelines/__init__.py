"""Pure-PyTorch stages of FaceMend. Nothing here imports ComfyUI.

Every stage takes batched float tensors [N, 3, H, W] in [0, 1] on any device.
"""
