"""End-to-end recipes built on the training core and the apps: quickstart, iterate, pipeline."""
