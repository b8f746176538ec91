"""Talking to the node's operating system: child processes (:mod:`~kpy.kernel.proc`) and
network namespaces (:mod:`~kpy.kernel.netns`). Used by the agent, the backends and the
tools; knows nothing of Services.
"""
