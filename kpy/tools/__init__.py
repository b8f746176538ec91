"""Operator tools on top of the core and the agent: ``kpy dump``, ``explain``, ``check``
and the namespace lab (:mod:`kpy.tools.lab`)."""
