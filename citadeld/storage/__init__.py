"""Durable state: the vector store's model (ops, filters), PostgreSQL migrations, the outbox and
the spill file. Actors live in ``citadeld.actors.vector`` and ``citadeld.actors.persistence``;
the durability logic that ties them together is ``citadeld.storage.service``."""
