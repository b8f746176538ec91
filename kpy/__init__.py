"""kpy: a kube-proxy replacement. See DESIGN in docs/architecture.md."""

__version__ = "0.1.0"
