"""weightstream: the command line and the demo, composing broker, publishers and subscribers."""

__all__: list[str] = []
