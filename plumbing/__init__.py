"""Shared plumbing every stage imports: config, Kafka clients, Redis, ledger, DLQ, metrics, local servers."""
