"""One module per model family; each defines a `Family` subclass registered in `converters.core.registry`."""
