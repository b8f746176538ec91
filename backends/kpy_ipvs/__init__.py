"""The ipvs backend for kpy (being built; see its README)."""
