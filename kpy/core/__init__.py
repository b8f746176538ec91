"""The pure core: what a node must do for every Service, worked out without I/O.

Kubernetes JSON in (:mod:`~kpy.core.convert`), frozen model values
(:mod:`~kpy.core.model`), the endpoints each service port uses on this node
(:mod:`~kpy.core.endpoints`), the dirty-set tracker that hands out Plans
(:mod:`~kpy.core.tracker`), keyed diffs (:mod:`~kpy.core.diff`), the backend contract
(:mod:`~kpy.core.backend`) and the packet-trace types every backend's tracer shares
(:mod:`~kpy.core.trace`). Nothing here does I/O, reads a clock or imports another part of
kpy (import-linter enforces it).
"""
