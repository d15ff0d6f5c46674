"""qcn.runtime: loads an artifact directory by its manifest and decodes. Never imports qcn.compile."""
