"""Human labeling: the item store, the web page and its server, and agreement between annotators."""
