"""The `assistant` command line: the one place that imports both the builder and the server."""
