#!/bin/bash
# Issue 21 demo: a GSM8K-shaped file published with one flag, scored by a running verifier; primerl tail on a live run.
set -u
cd /work/main
P=.venv/bin/primerl
SD=/tmp/gsm/state
rm -rf $SD
$P infra up --state-dir $SD
$P engine --state-dir $SD > /tmp/gsm/engine.log 2>&1 &
E=$!
$P verifier --state-dir $SD > /tmp/gsm/verifier.log 2>&1 &
V=$!
for i in $(seq 1 120); do grep -q "engine assigned \[" /tmp/gsm/engine.log && grep -q "verifier assigned \[" /tmp/gsm/verifier.log && break; sleep 2; done
echo "engine and verifier up after ~$((i*2)) s"
$P publish /tmp/gsm/gsm8k.jsonl --preset gsm8k --run-id gsm-demo --max-tokens 96 --temperature 0 --system-prompt "Solve the problem. Reply with the final number inside <answer></answer> tags, for example <answer>12</answer>." --state-dir $SD --no-progress
$P tail rollout.completions --run-id gsm-demo --from-beginning --follow --max-records 2 --state-dir $SD > /tmp/gsm/completions.jsonl &
T=$!
timeout 300 $P tail rollout.rewards --run-id gsm-demo --from-beginning --follow --max-records 2 --state-dir $SD > /tmp/gsm/rewards.jsonl
wait $T
kill -TERM $E $V; wait $E $V
$P infra down --state-dir $SD
python3 - <<'PY'
import json
for f in ("completions", "rewards"):
    rows = [json.loads(l) for l in open(f"/tmp/gsm/{f}.jsonl") if l.strip()]
    print(f, len(rows))
    for r in rows:
        m = r.get("message", r)
        print("  ", {k: m.get(k) for k in ("id", "completion_id", "reference", "text", "scalar", "status", "components") if k in m})
PY
