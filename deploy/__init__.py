"""moray.deploy."""
