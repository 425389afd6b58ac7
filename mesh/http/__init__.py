"""The HTTP side of a node: ``app`` (the OpenAI-compatible API, cluster view, metrics,
dashboard), ``requests`` (parsing and checking request bodies), ``discovery`` (the
``_mesh-api._tcp`` announcement and lookup) and ``client`` (what `mesh run` and the
tests use to talk to a node)."""
