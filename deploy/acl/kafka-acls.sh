#!/usr/bin/env bash
# Least-privilege Kafka ACLs of every primerl stage (generated from schemas/access.py by
# scripts/render_acls.py; do not edit). For Apache Kafka with an authorizer, e.g. KRaft:
#   authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
# Usage: BOOTSTRAP=host:9093 ADMIN_CONFIG=admin.properties deploy/acl/kafka-acls.sh
# Each stage logs in as User:<name> (kafka.sasl_username), e.g. with SCRAM:
#   kafka-configs.sh --bootstrap-server $BOOTSTRAP --command-config $ADMIN_CONFIG --alter \
#     --add-config 'SCRAM-SHA-512=[password=...]' --entity-type users --entity-name primerl-engine
set -euo pipefail
ADMIN=(--bootstrap-server "${BOOTSTRAP:?host:port of the broker}" --command-config "${ADMIN_CONFIG:?client properties of an admin}")

# primerl-router
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-router --operation Write --operation Describe --topic rollout.dlq
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-router --operation Read --operation Describe --topic rollout.prompts
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-router --operation Write --operation Describe --topic rollout.routed
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-router --operation Read --operation Describe --group router

# primerl-engine
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-engine --operation Read --operation Write --operation Describe --topic rollout.completion-chunks
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-engine --operation Write --operation Describe --topic rollout.completions
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-engine --operation Read --operation Write --operation Describe --topic rollout.deferred
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-engine --operation Write --operation Describe --topic rollout.dlq
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-engine --operation Read --operation Describe --topic rollout.policy
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-engine --operation Read --operation Write --operation Describe --topic rollout.prompts
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-engine --operation Read --operation Write --operation Describe --topic rollout.routed
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-engine --operation Read --operation Describe --group engine
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-engine --operation Read --operation Describe --group deferral
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-engine --operation Read --operation Describe --group router

# primerl-envhub
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-envhub --operation Read --operation Describe --topic rollout.completions
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-envhub --operation Write --operation Describe --topic rollout.dlq
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-envhub --operation Write --operation Describe --topic rollout.prompts
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-envhub --operation Write --operation Describe --topic rollout.trajectories
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-envhub --operation Read --operation Describe --group envhub

# primerl-verifier
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-verifier --operation Read --operation Describe --topic rollout.completions
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-verifier --operation Write --operation Describe --topic rollout.dlq
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-verifier --operation Write --operation Describe --topic rollout.rewards
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-verifier --operation Read --operation Describe --topic rollout.trajectories
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-verifier --operation Read --operation Describe --group verifier

# primerl-learner
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-learner --operation Read --operation Describe --topic rollout.completions
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-learner --operation Write --operation Describe --topic rollout.dlq
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-learner --operation Write --operation Describe --topic rollout.policy
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-learner --operation Read --operation Describe --topic rollout.rewards
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-learner --operation Read --operation Describe --topic rollout.trajectories
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-learner --operation Read --operation Describe --resource-pattern-type prefixed --group learner-

# primerl-archiver
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-archiver --operation Read --operation Describe --topic rollout.completion-chunks
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-archiver --operation Read --operation Describe --topic rollout.completions
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-archiver --operation Read --operation Describe --topic rollout.deferred
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-archiver --operation Read --operation Write --operation Describe --topic rollout.dlq
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-archiver --operation Read --operation Describe --topic rollout.policy
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-archiver --operation Read --operation Describe --topic rollout.prompts
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-archiver --operation Read --operation Describe --topic rollout.rewards
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-archiver --operation Read --operation Describe --topic rollout.routed
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-archiver --operation Read --operation Describe --topic rollout.trajectories
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-archiver --operation Read --operation Describe --group archiver

# primerl-producer
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-producer --operation Write --operation Describe --topic rollout.prompts

# primerl-operator
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Read --operation Describe --topic rollout.completion-chunks
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Read --operation Describe --topic rollout.completions
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Read --operation Describe --topic rollout.deferred
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Read --operation Describe --topic rollout.dlq
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Read --operation Describe --topic rollout.policy
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Read --operation Describe --topic rollout.prompts
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Read --operation Describe --topic rollout.rewards
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Read --operation Describe --topic rollout.routed
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Read --operation Describe --topic rollout.trajectories
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Read --operation Describe --resource-pattern-type prefixed --group observer-
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Read --operation Describe --resource-pattern-type prefixed --group rewards-reader-
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Read --operation Describe --resource-pattern-type prefixed --group dlq-reader-
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Read --operation Describe --resource-pattern-type prefixed --group prompts-reader-
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Read --operation Describe --resource-pattern-type prefixed --group tail-
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Create --operation Describe --cluster
kafka-acls.sh "${ADMIN[@]}" --add --allow-principal User:primerl-operator --operation Describe --group '*'
