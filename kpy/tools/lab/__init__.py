"""The namespace lab (``kpy lab``): nodes, pods and clients in network namespaces
(:mod:`~kpy.tools.lab.topology`), the pods' echo servers (:mod:`~kpy.tools.lab.echo`),
an optional real control plane (:mod:`~kpy.tools.lab.control_plane`; its clients in
:mod:`~kpy.tools.lab.api_client`, the Pods and Services the lab writes to it in
:mod:`~kpy.tools.lab.cluster_objects`) and the commands that bring it up and down
(:mod:`~kpy.tools.lab.lab`)."""
