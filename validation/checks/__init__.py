"""One module per claim; each defines ``CHECKS``, a list of :class:`validation.Check`."""
