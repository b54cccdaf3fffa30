"""Workers: consume the call-start and call-end queues, enrich, store, publish events."""
