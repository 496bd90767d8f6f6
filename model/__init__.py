"""moray.model."""
