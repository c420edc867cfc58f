"""The environment hub's library: environments, their tools (connectors) and the local corpus.

Environments load by name from the `primerl.envs` entry points (envhub.registry). The
Kafka stage that drives sessions turn by turn builds on this package; nothing here
talks to Kafka.
"""
