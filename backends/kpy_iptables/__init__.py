"""The iptables backend for kpy (being built; see its README)."""
