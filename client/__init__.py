"""Headless client: drives one or many ComfyUI servers through their own HTTP/websocket API (ComfyUI is the
engine; this only uploads, queues, follows and downloads). Standard library only.

    from facemend.client import Runner, load_workflow
    report = Runner(["http://127.0.0.1:8188"], load_workflow("demo"), "out").run(["photos/"])
"""
from .runner import Job, Runner, list_inputs
from .server import BadAnswer, PromptRejected, Server, ServerUnavailable
from .workflow import WorkflowError, apply_overrides, load_workflow

__all__ = ["Runner", "Job", "Server", "ServerUnavailable", "PromptRejected", "BadAnswer", "WorkflowError", "load_workflow",
           "apply_overrides", "list_inputs"]
