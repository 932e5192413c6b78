"""Host integration: model folders and devices, through ComfyUI when it is present, plain Python otherwise.

ComfyUI modules (folder_paths, comfy.*) are imported lazily here and nowhere in pipelines/.
"""
