"""The build stages: knowledge folder -> bundle. Imports only the shared core (``core``)."""
