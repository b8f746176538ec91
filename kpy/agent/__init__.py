"""The node agent: the sync loop and everything it runs beside the rules.

:mod:`~kpy.agent.agent` wires a source, the tracker and a backend; :mod:`~kpy.agent.runner`
decides when to sync; :mod:`~kpy.agent.quarantine` isolates objects the kernel refuses;
:mod:`~kpy.agent.config` reads file, environment and flags; :mod:`~kpy.agent.observers`
starts what operators talk to: the health server (:mod:`~kpy.agent.healthz` on
:mod:`~kpy.agent.http`), healthCheckNodePort servers (:mod:`~kpy.agent.service_health`),
metrics, Node events and the conntrack cleaner.
"""
