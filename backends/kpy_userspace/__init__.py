"""The userspace backend for kpy (being built; see its README)."""
