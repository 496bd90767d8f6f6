"""moray.actors."""
