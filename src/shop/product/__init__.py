"""The product service: the catalogue, its search, and the events announcing its changes."""
