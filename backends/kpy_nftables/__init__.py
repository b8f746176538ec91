"""The nftables backend for kpy (being built; see its README)."""
